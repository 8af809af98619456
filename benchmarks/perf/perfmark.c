/*
 * perfmark.c -- callgrind client requests for pyhot.py (loaded with ctypes).
 *
 * Under `valgrind --tool=callgrind --instr-atstart=no` the interpreter starts and
 * imports uninstrumented (fast); perf_begin() turns instrumentation on and zeroes the
 * counters, perf_dump() writes the counts since the last zero/dump to a part file and
 * zeroes them.  Outside valgrind these are no-ops.
 */
#include <valgrind/callgrind.h>

void perf_begin(void)
{
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
}

void perf_dump(const char *name)
{
    CALLGRIND_DUMP_STATS_AT(name);
}
