//! Metadata persistence: superblock and bitmap pages queued as `MetaWrite`, one at a
//! time, so nothing acts on metadata before it is durable.

use super::*;

impl Resource {
    pub(super) fn persist_superblock(&mut self) {
        let bytes = self.sb.encode();
        self.meta_queue
            .push_back((self.sb.layout.superblock_offset, bytes));
        self.issue_meta();
    }

    pub(super) fn persist_dirty_pages(&mut self) {
        for page in self.bitmap.dirty_page_indices() {
            self.persist_page(page);
        }
    }

    pub(super) fn persist_page(&mut self, page: usize) {
        let bytes = self.bitmap.take_page(page);
        let off = self.sb.layout.bitmap_offset + (page * PAGE_BYTES) as u64;
        self.meta_queue.push_back((off, bytes));
        self.issue_meta();
    }

    pub(super) fn issue_meta(&mut self) {
        if self.meta_in_flight.is_some() {
            return;
        }
        if self.meta_retry_at.is_some() {
            return;
        }
        if let Some((offset, bytes)) = self.meta_queue.pop_front() {
            let io = self.new_io(IoPurpose::Meta);
            self.meta_in_flight = Some((io, offset, bytes.clone()));
            self.actions
                .push_back(Action::MetaWrite { io, offset, bytes });
        }
    }

    pub(super) fn meta_busy(&self) -> bool {
        self.meta_in_flight.is_some() || !self.meta_queue.is_empty()
    }
}
