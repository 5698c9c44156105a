//! Reading and writing internal metadata on a backing device (block device or file).
//!
//! Metadata writes are `pwrite` + `fdatasync`: the sync also makes every data write that
//! completed before it durable, which the core's activity log relies on.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::core::meta::{self, Layout, MetaError, Metadata, Superblock};

/// Default AL ring length in 4 KiB transaction blocks.
pub const AL_SLOTS: u64 = 16;
pub const BLOCK_BYTES: u64 = 4096;
pub const AL_EXTENT_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MdError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Meta { path: String, err: MetaError },
    #[error("{path}: already holds Tandem metadata for resource {resource:?} node {node:?}; use --force to overwrite it")]
    Exists {
        path: String,
        resource: String,
        node: String,
    },
    #[error("{path}: {err}; refusing to overwrite a corrupt superblock without --force")]
    Corrupt { path: String, err: MetaError },
    #[error("{0}; refusing to write metadata under it")]
    InUse(std::io::Error),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> MdError + '_ {
    move |err| MdError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// Size of a block device or regular file.
pub fn device_bytes(f: &mut File) -> std::io::Result<u64> {
    f.seek(SeekFrom::End(0))
}

pub fn read_metadata(path: &Path) -> Result<Metadata, MdError> {
    let mut f = File::open(path).map_err(io(path))?;
    let size = device_bytes(&mut f).map_err(io(path))?;
    let mut read_err = None;
    let md = Metadata::read_with(size, |off, len| {
        let mut b = vec![0u8; len];
        if let Err(e) = f.read_exact_at(&mut b, off) {
            read_err.get_or_insert(e);
        }
        b
    });
    if let Some(e) = read_err {
        return Err(io(path)(e));
    }
    md.map_err(|err| MdError::Meta {
        path: path.display().to_string(),
        err,
    })
}

pub struct CreateOptions<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    pub al_extents: u32,
    pub force: bool,
    /// Both nodes of a new, empty pair start consistent and skip the initial sync.
    pub assume_clean: bool,
}

/// Write fresh metadata at the end of `path`. Refuses to overwrite existing or corrupt
/// metadata unless `force`.
pub fn create_metadata(path: &Path, o: &CreateOptions) -> Result<Superblock, MdError> {
    let p = path.display().to_string();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    // Never under a running daemon, --force or not.
    crate::shell::disk::lock_exclusive(&f, path).map_err(MdError::InUse)?;
    match read_metadata(path) {
        Ok(md) if !o.force => {
            return Err(MdError::Exists {
                path: p,
                resource: md.sb.resource,
                node: md.sb.node,
            })
        }
        Err(
            e @ MdError::Meta {
                err: MetaError::SizeChanged { .. },
                ..
            },
        ) if !o.force => return Err(e),
        Err(MdError::Meta { err, .. })
            if !o.force && !matches!(err, MetaError::NoMagic(_) | MetaError::TooSmall(_)) =>
        {
            return Err(MdError::Corrupt { path: p, err });
        }
        Err(e @ MdError::Io { .. }) => return Err(e),
        _ => {}
    }
    let size = device_bytes(&mut f).map_err(io(path))?;
    let layout = Layout::compute(size, BLOCK_BYTES, AL_SLOTS).map_err(|err| MdError::Meta {
        path: p.clone(),
        err,
    })?;
    let clean = o
        .assume_clean
        .then(|| meta::assume_clean_uuid(o.resource, layout.data_bytes));
    let sb = Superblock::fresh(
        layout,
        o.resource,
        o.node,
        AL_EXTENT_BYTES,
        o.al_extents,
        clean,
    );
    let zeros = vec![0u8; (layout.superblock_offset - layout.bitmap_offset) as usize];
    f.write_all_at(&zeros, layout.bitmap_offset)
        .map_err(io(path))?;
    f.write_all_at(&sb.encode(), layout.superblock_offset)
        .map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(sb)
}
