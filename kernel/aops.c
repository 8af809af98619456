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
	u8 *dst;
	int err;

	err = tkfs_ensure_keys(inode);
	if (err)
		return -EIO;
	dst = kmap_local_page(page);
	err = read_block(inode, page->index, dst);
	kunmap_local(dst);
	up_read(&TKFS_I(inode)->key_sem);
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
 * Write-back of block index (n plaintext bytes, a copy in buf + 12).  Before the first
 * block past the header's size, stored bytes past that size (left by a crash) are cut.
 */
static int write_block(struct inode *inode, u64 index, u8 *buf, size_t n)
{
	struct tkfs_inode *ii = TKFS_I(inode);
	loff_t start = (loff_t)index << PAGE_SHIFT;
	int err;

	err = tkfs_ensure_ready(inode);
	if (err)
		return err;
	mutex_lock(&ii->hdr_lock);
	if (!ii->tail_cut && start + n > ii->disk_size) {
		loff_t keep = tkfs_stored_len(ii->disk_size);

		if (i_size_read(ii->lower_inode) > keep)
			err = tkfs_lower_truncate(inode, keep);
		if (!err)
			ii->tail_cut = true;
	}
	mutex_unlock(&ii->hdr_lock);
	if (!err)
		err = store_block(inode, index, buf, n);
	up_read(&ii->key_sem);
	return err;
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

static int writepage_cb(struct page *page, struct writeback_control *wbc, void *data)
{
	struct inode *inode = page->mapping->host;
	loff_t isize = i_size_read(inode), start = (loff_t)page->index << PAGE_SHIFT;
	u8 *buf = data, *src;
	size_t n;
	int err;

	if (start >= isize) {	/* truncated meanwhile */
		unlock_page(page);
		return 0;
	}
	n = min_t(loff_t, PAGE_SIZE, isize - start);
	if (n < PAGE_SIZE)	/* bytes past EOF (an mmap store) are never stored */
		zero_user_segment(page, n, PAGE_SIZE);
	src = kmap_local_page(page);
	memcpy(buf + TAKA_NONCE, src, n);
	kunmap_local(src);
	set_page_writeback(page);
	unlock_page(page);
	err = write_block(inode, page->index, buf, n);
	if (err) {
		tkfs_report_eio(inode, page->index, "write-back failed");
		mapping_set_error(page->mapping, err);
		SetPageError(page);
	}
	end_page_writeback(page);
	return err;
}

static int tkfs_writepages(struct address_space *mapping, struct writeback_control *wbc)
{
	struct inode *inode = mapping->host;
	u8 *buf;
	int err;

	buf = kmalloc(TKFS_STORED_BS, GFP_NOFS);
	if (!buf)
		return -ENOMEM;
	err = write_cache_pages(mapping, wbc, writepage_cb, buf);
	kfree_sensitive(buf);
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
	u64 k;
	size_t n;
	int err;

	err = filemap_write_and_wait(inode->i_mapping);
	if (err)
		return err;
	if (ii->state == TKFS_HDR_EMPTY) {
		err = tkfs_create_header(inode);
		if (err)
			return err;
	}
	err = tkfs_ensure_ready(inode);
	if (err)
		return err;
	plain = kmalloc(PAGE_SIZE, GFP_NOFS);
	if (!plain) {
		err = -ENOMEM;
		goto out;
	}
	/* the header may still hold an older size: commit the blocks just written */
	mutex_lock(&ii->hdr_lock);
	if (oldsize != ii->disk_size) {
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
