//! Device and pinned host memory, all of it host memory of this process.
//!
//! A device pointer is the host address where the bytes live. `cuMemAlloc`
//! is an anonymous mapping; a `cuMemCreate` handle is a memfd, a reserved
//! range is an inaccessible anonymous mapping, and `cuMemMap` maps the memfd
//! over part of it, inaccessible until `cuMemSetAccess` (so a stray access
//! by the host faults as a device access would). Every copy checks, when it
//! is queued and again when its stream runs it, that its device bytes are
//! mapped and accessible: the second check is what catches memory unmapped
//! or freed while a stream still had work on it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::os::fd::OwnedFd;

use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{mmap, mmap_anonymous, mprotect, munmap, MapFlags, MprotectFlags, ProtFlags};

use cudarc::driver::sys::CUresult;

const HOST_PAGE: usize = 4096;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A physical allocation (`cuMemCreate`).
struct Phys {
    fd: OwnedFd,
    size: usize,
    maps: usize,
    released: bool,
}

/// One mapping of a physical allocation into a reserved range.
struct Mapping {
    handle: u64,
    size: usize,
    access: bool,
}

/// A reserved virtual range (`cuMemAddressReserve`).
struct Reservation {
    len: usize,
    /// Mappings by start address.
    maps: BTreeMap<u64, Mapping>,
}

/// Page-locked host memory known to the driver.
struct Pinned {
    len: usize,
    registered: bool,
}

/// All memory the fake device knows about.
pub struct Memory {
    pub capacity: usize,
    pub used: usize,
    pub granularity: usize,
    next_handle: u64,
    allocs: BTreeMap<u64, usize>,
    phys: HashMap<u64, Phys>,
    reserved: BTreeMap<u64, Reservation>,
    pinned: BTreeMap<usize, Pinned>,
}

type R<T> = Result<T, CUresult>;

impl Memory {
    pub fn new(capacity: usize, granularity: usize) -> Memory {
        Memory {
            capacity,
            used: 0,
            granularity,
            next_handle: 0x5000,
            allocs: BTreeMap::new(),
            phys: HashMap::new(),
            reserved: BTreeMap::new(),
            pinned: BTreeMap::new(),
        }
    }

    fn charge(&mut self, bytes: usize) -> R<()> {
        if self.used + bytes > self.capacity {
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
        self.used += bytes;
        Ok(())
    }

    /// `cuMemAlloc`.
    pub fn alloc(&mut self, len: usize) -> R<u64> {
        if len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let charged = round_up(len, HOST_PAGE);
        self.charge(charged)?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                charged,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        };
        match p {
            Ok(p) => {
                self.allocs.insert(p as u64, len);
                Ok(p as u64)
            }
            Err(_) => {
                self.used -= charged;
                Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY)
            }
        }
    }

    /// `cuMemFree`.
    pub fn free(&mut self, ptr: u64) -> R<()> {
        let len = self
            .allocs
            .remove(&ptr)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let charged = round_up(len, HOST_PAGE);
        // SAFETY: `ptr..ptr + charged` is the mapping `alloc` made, now forgotten.
        let _ = unsafe { munmap(ptr as *mut c_void, charged) };
        self.used -= charged;
        Ok(())
    }

    /// `cuMemCreate`.
    pub fn create(&mut self, size: usize) -> R<u64> {
        if size == 0 || size % self.granularity != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        self.charge(size)?;
        let fd = memfd_create("fakecuda-page", MemfdFlags::CLOEXEC)
            .and_then(|fd| ftruncate(&fd, size as u64).map(|()| fd));
        let fd = match fd {
            Ok(fd) => fd,
            Err(_) => {
                self.used -= size;
                return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
            }
        };
        let h = self.next_handle;
        self.next_handle += 1;
        self.phys.insert(
            h,
            Phys {
                fd,
                size,
                maps: 0,
                released: false,
            },
        );
        Ok(h)
    }

    /// `cuMemRelease`: the memory goes once its last mapping is unmapped.
    pub fn release(&mut self, handle: u64) -> R<()> {
        let p = self
            .phys
            .get_mut(&handle)
            .filter(|p| !p.released)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        p.released = true;
        if p.maps == 0 {
            let size = p.size;
            self.phys.remove(&handle);
            self.used -= size;
        }
        Ok(())
    }

    /// `cuMemAddressReserve`.
    pub fn reserve(&mut self, len: usize, align: usize) -> R<u64> {
        let align = if align == 0 { self.granularity } else { align };
        if len == 0 || len % self.granularity != 0 || !align.is_power_of_two() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let total = len + align;
        // SAFETY: a fresh inaccessible anonymous mapping at an address the kernel picks.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)? as usize;
        let base = round_up(p, align);
        // SAFETY: both pieces lie inside the mapping just made and outside
        // `base..base + len`, which is kept.
        unsafe {
            if base > p {
                let _ = munmap(p as *mut c_void, base - p);
            }
            let end = base + len;
            if p + total > end {
                let _ = munmap(end as *mut c_void, p + total - end);
            }
        }
        self.reserved.insert(
            base as u64,
            Reservation {
                len,
                maps: BTreeMap::new(),
            },
        );
        Ok(base as u64)
    }

    /// `cuMemAddressFree`: the whole range, with nothing mapped in it.
    pub fn address_free(&mut self, ptr: u64, len: usize) -> R<()> {
        match self.reserved.get(&ptr) {
            Some(r) if r.len == len && r.maps.is_empty() => {}
            _ => return Err(CUresult::CUDA_ERROR_INVALID_VALUE),
        }
        self.reserved.remove(&ptr);
        // SAFETY: the reservation's own mapping, now forgotten, with nothing mapped in it.
        let _ = unsafe { munmap(ptr as *mut c_void, len) };
        Ok(())
    }

    fn reservation_of(&mut self, ptr: u64, len: usize) -> R<&mut Reservation> {
        let (&base, r) = self
            .reserved
            .range_mut(..=ptr)
            .next_back()
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if ptr + len as u64 > base + r.len as u64 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        Ok(r)
    }

    /// `cuMemMap` of a whole physical allocation at `ptr`.
    pub fn map(&mut self, ptr: u64, size: usize, offset: usize, handle: u64) -> R<()> {
        let gran = self.granularity as u64;
        let (fd_size, fd) = match self.phys.get(&handle) {
            Some(p) if !p.released => (p.size, &p.fd),
            _ => return Err(CUresult::CUDA_ERROR_INVALID_HANDLE),
        };
        if offset != 0 || size != fd_size || ptr % gran != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: `dup` of a live descriptor.
        let fd = fd
            .try_clone()
            .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        let r = self.reservation_of(ptr, size)?;
        let end = ptr + size as u64;
        let overlaps = r
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&b, m)| b + m.size as u64 > ptr);
        if overlaps {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: `ptr..ptr + size` lies inside a range this driver reserved
        // and nothing is mapped there, so replacing it affects no other memory.
        unsafe {
            mmap(
                ptr as *mut c_void,
                size,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::FIXED,
                &fd,
                0,
            )
        }
        .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        r.maps.insert(
            ptr,
            Mapping {
                handle,
                size,
                access: false,
            },
        );
        if let Some(p) = self.phys.get_mut(&handle) {
            p.maps += 1;
        }
        Ok(())
    }

    /// `cuMemSetAccess` (read-write) over whole mappings.
    pub fn set_access(&mut self, ptr: u64, len: usize) -> R<()> {
        let r = self.reservation_of(ptr, len)?;
        let end = ptr + len as u64;
        let mut at = ptr;
        let mut todo = Vec::new();
        for (&b, m) in r.maps.range(ptr..end) {
            if b != at {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            at = b + m.size as u64;
            todo.push(b);
        }
        if at != end {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        for b in todo {
            let m = r.maps.get_mut(&b).expect("listed above");
            // SAFETY: `b..b + size` is one of our mappings of a memfd.
            unsafe {
                mprotect(
                    b as *mut c_void,
                    m.size,
                    MprotectFlags::READ | MprotectFlags::WRITE,
                )
            }
            .map_err(|_| CUresult::CUDA_ERROR_INVALID_VALUE)?;
            m.access = true;
        }
        Ok(())
    }

    /// `cuMemUnmap` of whole mappings.
    pub fn unmap(&mut self, ptr: u64, len: usize) -> R<()> {
        let r = self.reservation_of(ptr, len)?;
        let end = ptr + len as u64;
        let starts: Vec<u64> = r.maps.range(ptr..end).map(|(&b, _)| b).collect();
        if starts.is_empty() || starts.iter().any(|b| b + r.maps[b].size as u64 > end) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut handles = Vec::new();
        for b in starts {
            let m = r.maps.remove(&b).expect("listed above");
            // SAFETY: `b..b + size` is one of our mappings inside our reservation;
            // it goes back to inaccessible reserved address space.
            let _ = unsafe {
                mmap_anonymous(
                    b as *mut c_void,
                    m.size,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
                )
            };
            handles.push(m.handle);
        }
        for h in handles {
            let gone = match self.phys.get_mut(&h) {
                Some(p) => {
                    p.maps -= 1;
                    p.released && p.maps == 0
                }
                None => false,
            };
            if gone {
                let p = self.phys.remove(&h).expect("present");
                self.used -= p.size;
            }
        }
        Ok(())
    }

    /// Checks that `ptr..ptr + len` is device memory the device may access.
    pub fn check_device(&self, ptr: u64, len: usize) -> Result<(), String> {
        let end = ptr
            .checked_add(len as u64)
            .ok_or_else(|| format!("{ptr:#x} + {len} overflows"))?;
        if let Some((&b, &l)) = self.allocs.range(..=ptr).next_back() {
            if end <= b + l as u64 {
                return Ok(());
            }
        }
        let Some((&base, r)) = self.reserved.range(..=ptr).next_back() else {
            return Err(format!("{ptr:#x}..{end:#x} is not device memory"));
        };
        if end > base + r.len as u64 {
            return Err(format!(
                "{ptr:#x}..{end:#x} is not device memory (nearest range {base:#x}+{})",
                r.len
            ));
        }
        let mut at = ptr;
        let mut cur = r.maps.range(..=ptr).next_back();
        loop {
            match cur {
                Some((&b, m)) if b <= at && at < b + m.size as u64 => {
                    if !m.access {
                        return Err(format!(
                            "{at:#x} is mapped but cuMemSetAccess was not called for it"
                        ));
                    }
                    at = b + m.size as u64;
                    if at >= end {
                        return Ok(());
                    }
                    cur = r.maps.range(at..).next();
                }
                _ => {
                    return Err(format!(
                        "{at:#x} (in {ptr:#x}..{end:#x}) is reserved but not mapped"
                    ))
                }
            }
        }
    }

    /// `cuMemHostAlloc`.
    pub fn host_alloc(&mut self, len: usize) -> R<*mut c_void> {
        if len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                round_up(len, HOST_PAGE),
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        self.pinned.insert(
            p as usize,
            Pinned {
                len,
                registered: false,
            },
        );
        Ok(p)
    }

    /// `cuMemFreeHost`.
    pub fn free_host(&mut self, p: *mut c_void) -> R<()> {
        match self.pinned.get(&(p as usize)) {
            Some(x) if !x.registered => {}
            _ => return Err(CUresult::CUDA_ERROR_INVALID_VALUE),
        }
        let x = self.pinned.remove(&(p as usize)).expect("present");
        // SAFETY: the mapping `host_alloc` made, now forgotten.
        let _ = unsafe { munmap(p, round_up(x.len, HOST_PAGE)) };
        Ok(())
    }

    fn pinned_overlaps(&self, p: usize, len: usize) -> bool {
        self.pinned
            .range(..p + len)
            .next_back()
            .is_some_and(|(&b, x)| b + x.len > p)
    }

    /// `cuMemHostRegister`.
    pub fn register(&mut self, p: *mut c_void, len: usize) -> R<()> {
        if p.is_null() || len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if self.pinned_overlaps(p as usize, len) {
            return Err(CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
        }
        self.pinned.insert(
            p as usize,
            Pinned {
                len,
                registered: true,
            },
        );
        Ok(())
    }

    /// `cuMemHostUnregister`.
    pub fn unregister(&mut self, p: *mut c_void) -> R<()> {
        match self.pinned.get(&(p as usize)) {
            Some(x) if x.registered => {
                self.pinned.remove(&(p as usize));
                Ok(())
            }
            _ => Err(CUresult::CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED),
        }
    }

    /// Whether `p..p + len` lies in one page-locked host buffer.
    pub fn is_pinned(&self, p: usize, len: usize) -> bool {
        self.pinned
            .range(..=p)
            .next_back()
            .is_some_and(|(&b, x)| p + len <= b + x.len)
    }
}
