# Summarise a tracefs dump holding fuse:fuse_request_send and fuse_request_end events:
# one line per request kind, "COUNT KIND MEAN_US", where MEAN_US is the mean time from
# send to reply.  Used by fuse_requests.sh and pgbench_requests.sh (sort -rn after).
/fuse_request_send:/ {
  for (i = 1; i <= NF; i++) if ($i == "req") r = $(i + 1)
  t[r] = $4 + 0
  k[r] = substr($0, index($0, "(FUSE_") + 6)
  sub(/\).*/, "", k[r])
}
/fuse_request_end:/ {
  for (i = 1; i <= NF; i++) if ($i == "req") r = $(i + 1)
  if (r in t) { n[k[r]]++; s[k[r]] += $4 - t[r]; delete t[r] }
}
END { for (x in n) printf "%d %s %.0f\n", n[x], x, s[x] / n[x] * 1e6 }
