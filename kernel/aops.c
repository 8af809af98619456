// SPDX-License-Identifier: GPL-2.0
/*
 * aops.c - the page cache of plaintext over TAKA blocks: page i is block i (the block
 * size is the page size).  read_folio decrypts and verifies; writes dirty pages, which
 * writeback encrypts (a fresh nonce every time) into the lower file; the header's size
 * follows the blocks (growing) or goes first (shrinking), as docs/file-format.md orders.
 */
#include <linux/pagemap.h>
#include <linux/writeback.h>
#include <linux/highmem.h>
#include <linux/slab.h>
#include <linux/mpage.h>

#include "tkfs.h"

static bool all_zero(const u8 *p, size_t n)
{
	return !p[0] && !memcmp(p, p + 1, n - 1);
}

/*
 * Plaintext of block index into dst (PAGE_SIZE bytes, zero past the data).  key_sem is
 * read-held by the caller.  Blocks are laid out for the in-memory size: a clean page
 * was last written back for it (a size change rewrites the partial last block), and a
 * block past the header's size that is not stored yet reads as zeros (a hole not yet
 * written back).
 */
static int read_block(struct inode *inode, u64 index, u8 *dst)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	loff_t isize = i_size_read(inode), start = (loff_t)index << PAGE_SHIFT;
	loff_t off = tkfs_block_off(index), lsize;
	size_t n, m;
	ssize_t got;
	u8 *buf;
	int err;

	memset(dst, 0, PAGE_SIZE);
	if (start >= isize || ii->state == TKFS_HDR_EMPTY)
		return 0;
	n = min_t(loff_t, PAGE_SIZE, isize - start);
	buf = kmalloc(TKFS_STORED_BS, GFP_NOFS);
	if (!buf)
		return -ENOMEM;
	got = tkfs_lower_read(inode, buf, n + TAKA_OVERHEAD, off);
	if (got < 0) {
		err = got;
		goto out;
	}
	if (got < n + TAKA_OVERHEAD) {
		if (start < ii->disk_size || (got && !all_zero(buf, got))) {
			tkfs_report_eio(inode, index, "file truncated");
			err = -EIO;
		} else {
			err = 0;	/* past the stored size and not stored yet */
		}
		goto out;
	}
	if (all_zero(buf, n + TAKA_OVERHEAD)) {	/* a hole */
		err = 0;
		goto out;
	}
	err = tkfs_block_open(ii, index, buf, n);
	if (err == -EBADMSG && n < PAGE_SIZE) {
		/* the longer form of a last block (a crash inside a growing write) */
		lsize = i_size_read(ii->lower_inode);
		m = min_t(loff_t, TKFS_STORED_BS, lsize - off) - TAKA_OVERHEAD;
		if (lsize - off > n + TAKA_OVERHEAD && m > n) {
			got = tkfs_lower_read(inode, buf, m + TAKA_OVERHEAD, off);
			err = got == m + TAKA_OVERHEAD ? tkfs_block_open(ii, index, buf, m) : -EBADMSG;
		}
	}
	if (err) {
		tkfs_report_eio(inode, index, err == -EBADMSG ? "authentication failed" :
				err == -ENOKEY ? "key version of the block unavailable" :
				"decryption failed");
		err = -EIO;
		goto out;
	}
	memcpy(dst, buf + TAKA_NONCE, n);
out:
	kfree_sensitive(buf);
	return err;
}

static int fill_page(struct inode *inode, struct page *page)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	u8 *dst;
	int err;

	/*
	 * Past the end of a file with nothing stored yet (a new file: EMPTY, or its header
	 * made in memory and still pending) there is nothing to read and no key to wait for:
	 * zeros.  The new file's header is made by a worker (tkfs_prepare_new) under key_sem;
	 * a writer's first partial page must not wait for it.
	 */
	if (((loff_t)page->index << PAGE_SHIFT) >= i_size_read(inode) &&
	    (READ_ONCE(ii->state) == TKFS_HDR_EMPTY || READ_ONCE(ii->hdr_pending))) {
		zero_user(page, 0, PAGE_SIZE);
		return 0;
	}
	err = tkfs_ensure_keys(inode);
	if (err)
		return -EIO;
	dst = kmap_local_page(page);
	err = read_block(inode, page->index, dst);
	kunmap_local(dst);
	up_read(&ii->key_sem);
	flush_dcache_page(page);
	return err;
}

static int tkfs_read_folio(struct file *file, struct folio *folio)
{
	struct page *page = &folio->page;
	int err = fill_page(folio->mapping->host, page);

	if (!err)
		SetPageUptodate(page);
	else
		SetPageError(page);
	unlock_page(page);
	return err;
}

/*
 * Readahead: the stored blocks of up to TKFS_BATCH pages come in one lower read and are
 * decrypted straight into their pages.  A page this fast path cannot settle (a short
 * read, the longer form of a last block, a bad tag) is left not up to date: read_folio
 * then reads it alone, with the full checks and the EIO report.
 */
static void tkfs_readahead(struct readahead_control *rac)
{
	struct inode *inode = rac->mapping->host;
	struct tkfs_inode *ii = TKFS_I(inode);
	size_t cap = TKFS_BATCH;
	struct tkfs_crypt c;
	u8 *buf;

	if (tkfs_ensure_keys(inode))
		return;
	if (ii->state != TKFS_HDR_OK)
		goto unlock;
	cap = clamp_t(size_t, readahead_count(rac), 1, TKFS_BATCH);
	buf = kmalloc(cap * TKFS_STORED_BS, GFP_NOFS | __GFP_NOWARN | __GFP_NORETRY);
	if (!buf) {
		cap = 1;
		buf = kmalloc(TKFS_STORED_BS, GFP_NOFS);
		if (!buf)
			goto unlock;
	}
	if (tkfs_crypt_init(ii, &c))
		goto out;
	for (;;) {
		struct page *pages[TKFS_BATCH];
		loff_t isize = i_size_read(inode), start;
		size_t nr = 0, i, len, n;
		ssize_t got = 0;

		/* a readahead's pages are consecutive */
		while (nr < cap && (pages[nr] = readahead_page(rac)))
			nr++;
		if (!nr)
			break;
		start = (loff_t)pages[0]->index << PAGE_SHIFT;
		if (start < isize) {
			/* the blocks that hold data: full ones, then maybe a partial last */
			loff_t end = min_t(loff_t, isize, start + ((loff_t)nr << PAGE_SHIFT));

			len = (end - start) + DIV_ROUND_UP_ULL(end - start, PAGE_SIZE) * TAKA_OVERHEAD;
			got = tkfs_lower_read(inode, buf, len, tkfs_block_off(pages[0]->index));
			if (got < 0)
				got = 0;
		}
		for (i = 0; i < nr; i++) {
			struct page *page = pages[i];
			loff_t pstart = (loff_t)page->index << PAGE_SHIFT;
			u8 *blk = buf + i * TKFS_STORED_BS;
			bool ok = false;

			if (pstart >= isize) {
				zero_user(page, 0, PAGE_SIZE);	/* past the end */
				ok = true;
			} else {
				n = min_t(loff_t, PAGE_SIZE, isize - pstart);
				if (got >= i * TKFS_STORED_BS + n + TAKA_OVERHEAD) {
					if (all_zero(blk, n + TAKA_OVERHEAD)) {	/* a hole */
						zero_user(page, 0, PAGE_SIZE);
						ok = true;
					} else if (!tkfs_crypt_open(&c, page->index, blk, n, page)) {
						if (n < PAGE_SIZE)
							zero_user_segment(page, n, PAGE_SIZE);
						ok = true;
					}
				}
			}
			if (ok) {
				flush_dcache_page(page);
				SetPageUptodate(page);
			}
			unlock_page(page);
			put_page(page);
		}
	}
	tkfs_crypt_done(&c);
out:
	kfree(buf);	/* ciphertext only: decryption went to the pages */
unlock:
	up_read(&ii->key_sem);
}

/* ---- writeback ---------------------------------------------------------------------- */

/*
 * Seal n plaintext bytes at buf + 12 (one encryption taken from the header's lease) and
 * store the block; key_sem read-held, the header state OK.
 */
static int store_block(struct inode *inode, u64 index, u8 *buf, size_t n)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	ssize_t w;
	int err;

	mutex_lock(&ii->hdr_lock);
	err = tkfs_reserve_encryptions(inode, 1);
	mutex_unlock(&ii->hdr_lock);
	if (!err)
		err = tkfs_block_seal(ii, index, buf, n);
	if (err)
		return err;
	w = tkfs_lower_write(inode, buf, n + TAKA_OVERHEAD, tkfs_block_off(index));
	return w < 0 ? w : 0;
}

/*
 * The in-memory size reaches the header once every dirty page is stored: the lower file
 * is extended first (blocks never written are holes: zeros), then the header.
 */
int tkfs_commit_size(struct inode *inode)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	loff_t isize;
	int err;

	err = tkfs_ensure_keys(inode);
	if (err)
		return -EIO;
	if (ii->state != TKFS_HDR_OK) {
		up_read(&ii->key_sem);
		return ii->state == TKFS_HDR_EMPTY ? 0 : -EIO;
	}
	mutex_lock(&ii->hdr_lock);
	isize = i_size_read(inode);
	if (isize != ii->disk_size) {
		loff_t need = tkfs_stored_len(isize);

		err = 0;
		if (isize > ii->disk_size && i_size_read(ii->lower_inode) < need)
			err = tkfs_lower_truncate(inode, need);
		if (!err)
			err = tkfs_write_header(inode, isize, ii->hdr.encryptions);
	}
	mutex_unlock(&ii->hdr_lock);
	up_read(&ii->key_sem);
	return err;
}

/*
 * Write-back gathers runs of up to TKFS_BATCH consecutive dirty pages: their plaintext is
 * copied into one buffer (the pages are then under write-back and unlocked), sealed
 * block by block in place, and stored with one lower write.
 *
 * A new file's header (hdr_pending: made at its first write-back) goes out in the same
 * write as block 0, just before it.  If header and every block of the file fit in the
 * first lower page, the header carries the final size at once (a page is written whole
 * or not at all, so no commit_size write follows); else it says size 0 and the size
 * follows the blocks as always.
 */
struct wb_batch {
	struct page *pages[TKFS_BATCH];
	size_t nr, cap;
	size_t last_n;		/* plaintext bytes of the last page taken */
	u8 *buf;		/* a header, then cap stored blocks */
	bool plain_left;	/* a flush failed before sealing: buf holds plaintext */
};

static inline u8 *wb_block(struct wb_batch *b, size_t i)
{
	return b->buf + TAKA_HDR_SIZE + i * TKFS_STORED_BS;
}

/* seal and store the batch's blocks; end the pages' write-back */
static int wb_flush(struct inode *inode, struct wb_batch *b)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	u64 first;
	loff_t start, end;
	size_t i, len;
	struct tkfs_crypt c;
	bool locked = false, keyless = false;
	int err = 0;

	if (!b->nr)
		return 0;
	first = b->pages[0]->index;
	start = (loff_t)first << PAGE_SHIFT;
	end = start + ((loff_t)(b->nr - 1) << PAGE_SHIFT) + b->last_n;
	len = (b->nr - 1) * TKFS_STORED_BS + b->last_n + TAKA_OVERHEAD;
	if (READ_ONCE(ii->state) == TKFS_HDR_EMPTY)
		err = tkfs_create_header(inode, false);
	if (!err)
		err = tkfs_ensure_ready(inode);
	/* a header made in memory, never stored, whose keys were wiped (the agent went
	 * away): loading found the lower file empty and made the file EMPTY again; its
	 * header is made again now, or its pages would wait for the next write-back */
	if (err && READ_ONCE(ii->state) == TKFS_HDR_EMPTY) {
		err = tkfs_create_header(inode, false);
		if (!err)
			err = tkfs_ensure_ready(inode);
	}
	if (err) {
		/* no key now (no agent, or it withdrew the key): the pages stay dirty and
		 * are stored when the key can be had again; fsync reports the failure */
		keyless = ii->state != TKFS_HDR_BAD;
		goto end;
	}
	mutex_lock(&ii->hdr_lock);
	locked = true;
	/* before the first block past the header's size: stale stored bytes are cut */
	if (!ii->tail_cut && end > ii->disk_size) {
		loff_t keep = tkfs_stored_len(ii->disk_size);

		if (i_size_read(ii->lower_inode) > keep)
			err = tkfs_lower_truncate(inode, keep);
		if (!err)
			ii->tail_cut = true;
	}
	if (!err)
		err = tkfs_reserve_encryptions(inode, b->nr);
	/* a pending header goes with block 0 (under hdr_lock: no other header write
	 * may pass it); a batch that does not start at block 0 writes it first */
	if (!err && ii->hdr_pending && first)
		err = tkfs_write_header(inode, ii->disk_size, ii->hdr.encryptions);
	if (!err && !ii->hdr_pending) {
		mutex_unlock(&ii->hdr_lock);
		locked = false;
	}
	if (!err)
		err = tkfs_crypt_init(ii, &c);
	if (!err) {
		for (i = 0; i < b->nr && !err; i++)
			err = tkfs_crypt_seal(&c, first + i, wb_block(b, i),
					      i == b->nr - 1 ? b->last_n : PAGE_SIZE);
		tkfs_crypt_done(&c);
	}
	if (!err && locked) {
		/* the new file's header and its first blocks in one write */
		u64 size = ii->disk_size;

		if (end == i_size_read(inode) && TAKA_HDR_SIZE + len <= PAGE_SIZE)
			size = end;
		err = tkfs_hdr_seal(ii, size, ii->hdr.encryptions);
		if (!err) {
			ssize_t w;

			memcpy(b->buf, ii->hdr.raw, TAKA_HDR_SIZE);
			w = tkfs_lower_write(inode, b->buf, TAKA_HDR_SIZE + len, 0);
			err = w < 0 ? w : 0;	/* ENOSPC stays ENOSPC */
		}
		if (!err) {
			ii->disk_size = size;
			ii->hdr_pending = false;
		}
	} else if (!err) {
		ssize_t w = tkfs_lower_write(inode, wb_block(b, 0), len, tkfs_block_off(first));

		err = w < 0 ? w : 0;
	}
	if (locked)
		mutex_unlock(&ii->hdr_lock);
	up_read(&ii->key_sem);
end:
	if (err)
		b->plain_left = true;
	for (i = 0; i < b->nr; i++) {
		struct page *page = b->pages[i];

		if (err && keyless) {
			/* not locked (a lower page than the one write_cache_pages holds);
			 * under write-back truncation waits, so the mapping is stable.  The
			 * error goes to fsync (errseq) only, not to the mapping's AS_EIO
			 * flag: the pages are not lost, and a truncate or raw open after the
			 * key is back, whose own write-back succeeds, must not fail for it */
			filemap_set_wb_err(page->mapping, -EIO);
			WRITE_ONCE(ii->keyless_wb, true);
			__set_page_dirty_nobuffers(page);
		} else if (err) {
			if (err != -ENOSPC && err != -EDQUOT)	/* a full disk is no integrity event */
				tkfs_report_eio(inode, page->index, "write-back failed");
			mapping_set_error(page->mapping, err);
			SetPageError(page);
		}
		end_page_writeback(page);
	}
	b->nr = 0;
	return err;
}

static int writepage_cb(struct page *page, struct writeback_control *wbc, void *data)
{
	struct inode *inode = page->mapping->host;
	struct wb_batch *b = data;
	loff_t isize = i_size_read(inode), start = (loff_t)page->index << PAGE_SHIFT;
	u8 *src;
	size_t n;
	int err = 0;

	if (start >= isize) {	/* truncated meanwhile */
		unlock_page(page);
		return 0;
	}
	n = min_t(loff_t, PAGE_SIZE, isize - start);
	if (b->nr && (b->nr == b->cap || b->last_n != PAGE_SIZE ||
		      page->index != b->pages[b->nr - 1]->index + 1))
		err = wb_flush(inode, b);
	if (n < PAGE_SIZE)	/* bytes past EOF (an mmap store) are never stored */
		zero_user_segment(page, n, PAGE_SIZE);
	src = kmap_local_page(page);
	memcpy(wb_block(b, b->nr) + TAKA_NONCE, src, n);
	kunmap_local(src);
	set_page_writeback(page);
	unlock_page(page);
	b->pages[b->nr++] = page;
	b->last_n = n;
	return err;
}

static int tkfs_writepages(struct address_space *mapping, struct writeback_control *wbc)
{
	struct inode *inode = mapping->host;
	struct wb_batch b = { .cap = TKFS_BATCH };
	int err, err2;

	/* no larger than the file (most are a block or two) */
	b.cap = clamp_t(u64, DIV_ROUND_UP_ULL(i_size_read(inode), PAGE_SIZE), 1, TKFS_BATCH);
	b.buf = kmalloc(TAKA_HDR_SIZE + b.cap * TKFS_STORED_BS,
			GFP_NOFS | __GFP_NOWARN | __GFP_NORETRY);
	if (!b.buf) {
		b.cap = 1;
		b.buf = kmalloc(TAKA_HDR_SIZE + TKFS_STORED_BS, GFP_NOFS);
		if (!b.buf)
			return -ENOMEM;
	}
	err = write_cache_pages(mapping, wbc, writepage_cb, &b);
	err2 = wb_flush(inode, &b);
	if (!err)
		err = err2;
	if (b.plain_left)
		kfree_sensitive(b.buf);
	else
		kfree(b.buf);	/* sealed blocks only */
	if (err)
		return err;
	/* every block is stored (none dirty, none in flight elsewhere): the size may follow */
	if (!mapping_tagged(mapping, PAGECACHE_TAG_DIRTY) &&
	    !mapping_tagged(mapping, PAGECACHE_TAG_WRITEBACK) &&
	    i_size_read(inode) != TKFS_I(inode)->disk_size)
		err = tkfs_commit_size(inode);
	return err;
}

/* ---- buffered writes ---------------------------------------------------------------- */

/*
 * A write that starts past the page of the end of the file: the old partial last block
 * is rewritten at its new length (zero-extended), so its page is dirtied here.
 */
static int extend_prepare(struct inode *inode, loff_t pos)
{
	loff_t isize = i_size_read(inode);
	pgoff_t last = isize >> PAGE_SHIFT;
	struct page *page;

	if (pos <= isize || !(isize & ~PAGE_MASK) || (pos >> PAGE_SHIFT) == last)
		return 0;
	page = read_mapping_page(inode->i_mapping, last, NULL);
	if (IS_ERR(page))
		return PTR_ERR(page);
	lock_page(page);
	zero_user_segment(page, isize & ~PAGE_MASK, PAGE_SIZE);
	set_page_dirty(page);
	unlock_page(page);
	put_page(page);
	return 0;
}

static int tkfs_write_begin(struct file *file, struct address_space *mapping, loff_t pos,
			    unsigned int len, struct page **pagep, void **fsdata)
{
	struct inode *inode = mapping->host;
	struct page *page;
	int err;

	err = extend_prepare(inode, pos);
	if (err)
		return err;
	page = grab_cache_page_write_begin(mapping, pos >> PAGE_SHIFT);
	if (!page)
		return -ENOMEM;
	if (!PageUptodate(page) && len != PAGE_SIZE) {
		err = fill_page(inode, page);
		if (err) {
			unlock_page(page);
			put_page(page);
			return err;
		}
		SetPageUptodate(page);
	}
	*pagep = page;
	return 0;
}

static int tkfs_write_end(struct file *file, struct address_space *mapping, loff_t pos,
			  unsigned int len, unsigned int copied, struct page *page, void *fsdata)
{
	struct inode *inode = page->mapping->host;
	loff_t last = pos + copied;

	/* a page not read first (whole-page write) that came up short: zero the rest */
	if (!PageUptodate(page)) {
		if (copied < len)
			zero_user(page, (pos & ~PAGE_MASK) + copied, len - copied);
		SetPageUptodate(page);
	}
	if (last > inode->i_size)
		i_size_write(inode, last);
	set_page_dirty(page);
	unlock_page(page);
	put_page(page);
	return copied;
}

const struct address_space_operations tkfs_aops = {
	.read_folio = tkfs_read_folio,
	.readahead = tkfs_readahead,
	.writepages = tkfs_writepages,
	.dirty_folio = filemap_dirty_folio,
	.write_begin = tkfs_write_begin,
	.write_end = tkfs_write_end,
};

/* ---- size changes (truncate), synchronous ------------------------------------------- */

/* re-encrypt block index at length n from plain (PAGE_SIZE bytes) */
static int rewrite_block_from(struct inode *inode, u64 index, const u8 *plain, size_t n)
{
	u8 *buf = kmalloc(TKFS_STORED_BS, GFP_NOFS);
	int err;

	if (!buf)
		return -ENOMEM;
	memcpy(buf + TAKA_NONCE, plain, n);
	err = store_block(inode, index, buf, n);
	kfree_sensitive(buf);
	return err;
}

/*
 * truncate(2)/ftruncate(2)/O_TRUNC: all dirty pages are stored first, then
 * shrinking: header with the new size, the new partial last block re-encrypted, the
 * lower file cut; growing: the stale tail cut, the old partial last block rewritten
 * at its new length, the lower file extended (holes), then the header.
 * Called with the inode lock held.
 */
int tkfs_setsize(struct inode *inode, loff_t newsize)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	loff_t oldsize = i_size_read(inode);
	u8 *plain = NULL;
	int renewed = 0;
	u64 k;
	size_t n;
	int err;

	err = filemap_write_and_wait(inode->i_mapping);
	if (err)
		return err;
	if (ii->state == TKFS_HDR_EMPTY) {
		err = tkfs_create_header(inode, true);
		if (err)
			return err;
	}
	err = tkfs_ensure_ready(inode);
	if (err)
		return err;
	if (newsize == 0) {
		/* to 0: a header on an older version (a rotation since) is renewed */
		up_read(&ii->key_sem);
		renewed = tkfs_renew_header(inode);
		if (renewed < 0)
			return renewed;
		err = tkfs_ensure_ready(inode);
		if (err)
			return err;
	}
	plain = kmalloc(PAGE_SIZE, GFP_NOFS);
	if (!plain) {
		err = -ENOMEM;
		goto out;
	}
	/* the header may still hold an older size: commit the blocks just written (not
	 * after a renewal: they are under the old header's keys, and about to go) */
	mutex_lock(&ii->hdr_lock);
	if (oldsize != ii->disk_size && !renewed) {
		if (oldsize > ii->disk_size &&
		    i_size_read(ii->lower_inode) < tkfs_stored_len(oldsize))
			err = tkfs_lower_truncate(inode, tkfs_stored_len(oldsize));
		if (!err)
			err = tkfs_write_header(inode, oldsize, ii->hdr.encryptions);
	}
	mutex_unlock(&ii->hdr_lock);
	if (err)
		goto out;

	if (newsize < oldsize) {
		k = newsize >> PAGE_SHIFT;
		n = newsize & ~PAGE_MASK;
		if (n) {
			err = read_block(inode, k, plain);
			if (err)
				goto out;
		}
		mutex_lock(&ii->hdr_lock);
		err = tkfs_write_header(inode, newsize, ii->hdr.encryptions);
		mutex_unlock(&ii->hdr_lock);
		if (!err && n)
			err = rewrite_block_from(inode, k, plain, n);
		if (!err)
			err = tkfs_lower_truncate(inode, tkfs_stored_len(newsize));
		if (!err)
			truncate_setsize(inode, newsize);
	} else if (newsize > oldsize) {
		mutex_lock(&ii->hdr_lock);
		if (i_size_read(ii->lower_inode) > tkfs_stored_len(oldsize))
			err = tkfs_lower_truncate(inode, tkfs_stored_len(oldsize));
		ii->tail_cut = true;
		mutex_unlock(&ii->hdr_lock);
		k = oldsize >> PAGE_SHIFT;
		n = oldsize & ~PAGE_MASK;
		if (!err && n) {
			err = read_block(inode, k, plain);
			if (!err)
				err = rewrite_block_from(inode, k, plain,
							 min_t(loff_t, PAGE_SIZE, newsize - ((loff_t)k << PAGE_SHIFT)));
		}
		if (!err)
			err = tkfs_lower_truncate(inode, tkfs_stored_len(newsize));
		if (!err) {
			mutex_lock(&ii->hdr_lock);
			err = tkfs_write_header(inode, newsize, ii->hdr.encryptions);
			mutex_unlock(&ii->hdr_lock);
		}
		if (!err)
			truncate_setsize(inode, newsize);
	}
out:
	kfree_sensitive(plain);
	up_read(&ii->key_sem);
	return err;
}
