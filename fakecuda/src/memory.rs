//! Device and pinned host memory, all of it host memory of this process.
//!
//! A device address is never host-accessible: every allocation and reserved
//! range is inaccessible address space, and its bytes live at another
//! address, its *shadow*, which only the driver's own operations use (so a
//! host dereference of a device pointer faults, as on a GPU). `cuMemAlloc`
//! shadows with an anonymous mapping; `cuMemCreate` takes a piece of one
//! memfd the size of the device, and `cuMemMap` maps that piece into the
//! reserved range's shadow, inaccessible until `cuMemSetAccess`. New device
//! and pinned memory is filled with [`POISON`], since a real driver does
//! not zero it.
//!
//! Every operation finds its device bytes through [`Memory::resolve`], when
//! it is queued (an error) and again when its stream runs it (the process
//! aborts): the second check is what catches memory unmapped or freed while
//! a stream still had work on it. Pinned host buffers count the queued
//! operations that use them, and freeing or unregistering one with work
//! pending aborts too.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::fs::{fallocate, ftruncate, memfd_create, FallocateFlags, MemfdFlags};
use rustix::mm::{mmap, mmap_anonymous, mprotect, munmap, MapFlags, MprotectFlags, ProtFlags};

use cudarc::driver::sys::CUresult;

/// The byte new device and pinned memory holds.
pub const POISON: u8 = 0xA5;

const HOST_PAGE: usize = 4096;

type R<T> = Result<T, CUresult>;

fn round_up(n: usize, to: usize) -> R<usize> {
    n.checked_next_multiple_of(to)
        .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)
}

/// Inaccessible address space of `len` bytes at an address the kernel picks.
fn reserve_space(len: usize) -> R<usize> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map(|p| p as usize)
    .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)
}

/// Readable and writable memory of `len` bytes, filled with [`POISON`].
fn poisoned(len: usize) -> R<usize> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let p = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
    // SAFETY: the `len` bytes just mapped, readable and writable.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), POISON, len) };
    Ok(p as usize)
}

/// Makes `addr..addr + len`, which this module mapped, inaccessible space again.
///
/// # Safety
/// The range is a mapping of this module that nothing else uses.
unsafe fn back_to_reserved(addr: usize, len: usize) {
    // SAFETY: the caller's contract; a fixed mapping over our own mapping.
    let _ = unsafe {
        mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
        )
    };
}

/// A `cuMemAlloc` allocation: inaccessible at its device address, its bytes
/// at `shadow`. The address is 256 bytes into a reservation of `charged`
/// plus a page starting at `va`: the driver promises 256-byte alignment,
/// no more, and a backend that assumes more should find out here.
struct Alloc {
    len: usize,
    charged: usize,
    shadow: usize,
    va: usize,
}

/// How far into its reservation a `cuMemAlloc` address is.
const ALLOC_OFFSET: usize = 256;

/// A physical allocation (`cuMemCreate`): a piece of the device file.
struct Phys {
    offset: u64,
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

/// A reserved virtual range (`cuMemAddressReserve`) and its shadow.
struct Reservation {
    len: usize,
    shadow: usize,
    /// Mappings by device address.
    maps: BTreeMap<u64, Mapping>,
}

/// Page-locked host memory known to the driver.
struct Pinned {
    len: usize,
    registered: bool,
    read_only: bool,
    /// The flags `cuMemHostAlloc` was given (0 for a registration).
    flags: u32,
    /// Queued operations that read or write it.
    pending: Arc<AtomicUsize>,
}

/// A page-locked host range an operation uses: decrement `pending` when done.
pub struct PinnedUse {
    pub read_only: bool,
    pub pending: Arc<AtomicUsize>,
}

/// All memory the fake device knows about.
pub struct Memory {
    pub capacity: usize,
    pub used: usize,
    pub granularity: usize,
    /// The device's physical memory, created at the first `cuMemCreate`.
    file: Option<OwnedFd>,
    /// Free pieces of the file: offset → length.
    free: BTreeMap<u64, u64>,
    next_handle: u64,
    allocs: BTreeMap<u64, Alloc>,
    phys: HashMap<u64, Phys>,
    reserved: BTreeMap<u64, Reservation>,
    pinned: BTreeMap<usize, Pinned>,
}

impl Memory {
    pub fn new(capacity: usize, granularity: usize) -> Memory {
        Memory {
            capacity,
            used: 0,
            granularity,
            file: None,
            free: BTreeMap::from([(0, capacity as u64)]),
            next_handle: 0x5000,
            allocs: BTreeMap::new(),
            phys: HashMap::new(),
            reserved: BTreeMap::new(),
            pinned: BTreeMap::new(),
        }
    }

    fn charge(&mut self, bytes: usize) -> R<()> {
        match self.used.checked_add(bytes) {
            Some(u) if u <= self.capacity => {
                self.used = u;
                Ok(())
            }
            _ => Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
        }
    }

    /// `cuMemAlloc`.
    pub fn alloc(&mut self, len: usize) -> R<u64> {
        if len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let charged = round_up(len, HOST_PAGE)?;
        self.charge(charged)?;
        let made = reserve_space(charged + HOST_PAGE).and_then(|va| match poisoned(charged) {
            Ok(shadow) => Ok((va, shadow)),
            Err(e) => {
                // SAFETY: the reservation just made, not handed out.
                let _ = unsafe { munmap(va as *mut c_void, charged + HOST_PAGE) };
                Err(e)
            }
        });
        match made {
            Ok((va, shadow)) => {
                let addr = (va + ALLOC_OFFSET) as u64;
                self.allocs.insert(
                    addr,
                    Alloc {
                        len,
                        charged,
                        shadow,
                        va,
                    },
                );
                Ok(addr)
            }
            Err(e) => {
                self.used -= charged;
                Err(e)
            }
        }
    }

    /// `cuMemFree`.
    pub fn free(&mut self, ptr: u64) -> R<()> {
        let a = self
            .allocs
            .remove(&ptr)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: the reservation and shadow `alloc` made, now forgotten.
        unsafe {
            let _ = munmap(a.va as *mut c_void, a.charged + HOST_PAGE);
            let _ = munmap(a.shadow as *mut c_void, a.charged);
        }
        self.used -= a.charged;
        Ok(())
    }

    fn file(&mut self) -> R<&OwnedFd> {
        if self.file.is_none() {
            let fd = memfd_create("fakecuda-device", MemfdFlags::CLOEXEC)
                .and_then(|fd| ftruncate(&fd, self.capacity as u64).map(|()| fd))
                .map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
            self.file = Some(fd);
        }
        Ok(self.file.as_ref().expect("just set"))
    }

    /// A free piece of the file of `size` bytes (first fit).
    fn take(&mut self, size: u64) -> Option<u64> {
        let (&off, &len) = self.free.iter().find(|(_, &l)| l >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        Some(off)
    }

    /// Gives a piece of the file back (its pages to the kernel too).
    fn give(&mut self, mut off: u64, mut len: u64) {
        if let Some(fd) = &self.file {
            let _ = fallocate(
                fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                off,
                len,
            );
        }
        if let Some((&p, &l)) = self.free.range(..off).next_back() {
            if p + l == off {
                self.free.remove(&p);
                off = p;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += l;
        }
        self.free.insert(off, len);
    }

    /// `cuMemCreate`.
    pub fn create(&mut self, size: usize) -> R<u64> {
        if size == 0 || size % self.granularity != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        self.charge(size)?;
        let Some(offset) = self.take(size as u64) else {
            self.used -= size;
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        };
        let poison = vec![POISON; size.min(1 << 20)];
        let written = self.file().and_then(|fd| {
            let mut done = 0;
            while done < size {
                let n = poison.len().min(size - done);
                match rustix::io::pwrite(fd, &poison[..n], offset + done as u64) {
                    Ok(w) if w > 0 => done += w,
                    _ => return Err(CUresult::CUDA_ERROR_UNKNOWN),
                }
            }
            Ok(())
        });
        if let Err(e) = written {
            self.give(offset, size as u64);
            self.used -= size;
            return Err(e);
        }
        let h = self.next_handle;
        self.next_handle += 1;
        self.phys.insert(
            h,
            Phys {
                offset,
                size,
                maps: 0,
                released: false,
            },
        );
        Ok(h)
    }

    fn drop_phys(&mut self, handle: u64) {
        if let Some(p) = self.phys.remove(&handle) {
            self.give(p.offset, p.size as u64);
            self.used -= p.size;
        }
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
            self.drop_phys(handle);
        }
        Ok(())
    }

    /// `cuMemAddressReserve`.
    pub fn reserve(&mut self, len: usize, align: usize) -> R<u64> {
        let align = if align == 0 { self.granularity } else { align };
        if len == 0 || len % self.granularity != 0 || !align.is_power_of_two() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let total = len
            .checked_add(align)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let p = reserve_space(total)?;
        let base = round_up(p, align)?;
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
        let shadow = match reserve_space(len) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: the reservation just made, not handed out.
                let _ = unsafe { munmap(base as *mut c_void, len) };
                return Err(e);
            }
        };
        self.reserved.insert(
            base as u64,
            Reservation {
                len,
                shadow,
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
        let r = self.reserved.remove(&ptr).expect("checked above");
        // SAFETY: the reservation's own mappings, now forgotten, with nothing mapped in them.
        unsafe {
            let _ = munmap(ptr as *mut c_void, len);
            let _ = munmap(r.shadow as *mut c_void, len);
        }
        Ok(())
    }

    fn reservation_of(&mut self, ptr: u64, len: usize) -> R<(u64, &mut Reservation)> {
        let (&base, r) = self
            .reserved
            .range_mut(..=ptr)
            .next_back()
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let end = ptr
            .checked_add(len as u64)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if end > base + r.len as u64 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        Ok((base, r))
    }

    /// `cuMemMap` of a whole physical allocation at `ptr`.
    pub fn map(&mut self, ptr: u64, size: usize, offset: usize, handle: u64) -> R<()> {
        let gran = self.granularity as u64;
        let (file_off, phys_size) = match self.phys.get(&handle) {
            Some(p) if !p.released => (p.offset, p.size),
            _ => return Err(CUresult::CUDA_ERROR_INVALID_HANDLE),
        };
        if offset != 0 || size != phys_size || ptr % gran != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let fd = self
            .file()?
            .try_clone()
            .map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
        let (base, r) = self.reservation_of(ptr, size)?;
        let end = ptr + size as u64;
        let overlaps = r
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&b, m)| b + m.size as u64 > ptr);
        if overlaps {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let at = r.shadow + (ptr - base) as usize;
        // SAFETY: `at..at + size` lies inside this reservation's shadow and
        // nothing is mapped there, so replacing it affects no other memory.
        unsafe {
            mmap(
                at as *mut c_void,
                size,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::FIXED,
                &fd,
                file_off,
            )
        }
        .map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
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
        let (base, r) = self.reservation_of(ptr, len)?;
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
            let shadow = r.shadow + (b - base) as usize;
            // SAFETY: `shadow..shadow + size` is one of our mappings of the device file.
            unsafe {
                mprotect(
                    shadow as *mut c_void,
                    m.size,
                    MprotectFlags::READ | MprotectFlags::WRITE,
                )
            }
            .map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
            m.access = true;
        }
        Ok(())
    }

    /// `cuMemUnmap` of whole mappings, exactly the range given.
    pub fn unmap(&mut self, ptr: u64, len: usize) -> R<()> {
        let (base, r) = self.reservation_of(ptr, len)?;
        let end = ptr + len as u64;
        let mut at = ptr;
        let mut starts = Vec::new();
        for (&b, m) in r.maps.range(ptr..end) {
            if b != at {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            at = b + m.size as u64;
            starts.push(b);
        }
        if starts.is_empty() || at != end {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut handles = Vec::new();
        for b in starts {
            let m = r.maps.remove(&b).expect("listed above");
            // SAFETY: one of our mappings inside this reservation's shadow;
            // it goes back to inaccessible reserved space.
            unsafe { back_to_reserved(r.shadow + (b - base) as usize, m.size) };
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
                self.drop_phys(h);
            }
        }
        Ok(())
    }

    /// Where the bytes of device memory `ptr..ptr + len` live, if the device
    /// may access all of it.
    pub fn resolve(&self, ptr: u64, len: usize) -> Result<usize, String> {
        let end = ptr
            .checked_add(len as u64)
            .ok_or_else(|| format!("{ptr:#x} + {len} overflows"))?;
        if let Some((&b, a)) = self.allocs.range(..=ptr).next_back() {
            if end <= b + a.len as u64 {
                return Ok(a.shadow + (ptr - b) as usize);
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
                        return Ok(r.shadow + (ptr - base) as usize);
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

    /// Whether `p..p + len` overlaps a device address range (a host pointer
    /// that is really a device pointer).
    pub fn is_device_address(&self, p: usize, len: usize) -> bool {
        let (p, end) = (p as u64, (p as u64).saturating_add(len as u64));
        let alloc = self
            .allocs
            .range(..end)
            .next_back()
            .is_some_and(|(&b, a)| b + a.charged as u64 > p);
        let range = self
            .reserved
            .range(..end)
            .next_back()
            .is_some_and(|(&b, r)| b + r.len as u64 > p);
        alloc || range
    }

    /// `cuMemHostAlloc`.
    pub fn host_alloc(&mut self, len: usize, flags: u32) -> R<*mut c_void> {
        if len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let p = poisoned(round_up(len, HOST_PAGE)?)?;
        self.pinned.insert(
            p,
            Pinned {
                len,
                registered: false,
                read_only: false,
                flags,
                pending: Arc::default(),
            },
        );
        Ok(p as *mut c_void)
    }

    /// Refuses to forget a pinned buffer some queued operation still uses.
    fn idle(x: &Pinned, what: &str, p: usize) -> Result<(), String> {
        match x.pending.load(Ordering::Acquire) {
            0 => Ok(()),
            n => Err(format!(
                "{what} of {p:#x} ({} bytes) while {n} queued operation(s) still use it",
                x.len
            )),
        }
    }

    /// `cuMemFreeHost`; `Err(Ok(code))` is an error to return,
    /// `Err(Err(message))` a use-after-free to abort on.
    pub fn free_host(&mut self, p: *mut c_void) -> Result<(), Result<CUresult, String>> {
        let at = p as usize;
        match self.pinned.get(&at) {
            Some(x) if !x.registered => Self::idle(x, "cuMemFreeHost", at).map_err(Err)?,
            _ => return Err(Ok(CUresult::CUDA_ERROR_INVALID_VALUE)),
        }
        let x = self.pinned.remove(&at).expect("present");
        // SAFETY: the mapping `host_alloc` made, now forgotten.
        let _ = unsafe { munmap(p, round_up(x.len, HOST_PAGE).unwrap_or(x.len)) };
        Ok(())
    }

    /// `cuMemHostGetFlags`: the flags a `cuMemHostAlloc` buffer was made
    /// with, for the buffer's first byte.
    pub fn host_flags(&self, p: *mut c_void) -> R<u32> {
        match self.pinned.get(&(p as usize)) {
            Some(x) if !x.registered => Ok(x.flags),
            _ => Err(CUresult::CUDA_ERROR_INVALID_VALUE),
        }
    }

    fn pinned_overlaps(&self, p: usize, len: usize) -> bool {
        let end = p.saturating_add(len);
        self.pinned
            .range(..end)
            .next_back()
            .is_some_and(|(&b, x)| b + x.len > p)
    }

    /// `cuMemHostRegister`.
    pub fn register(&mut self, p: *mut c_void, len: usize, read_only: bool) -> R<()> {
        if p.is_null() || len == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if self.is_device_address(p as usize, len) {
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
                flags: 0,
                read_only,
                pending: Arc::default(),
            },
        );
        Ok(())
    }

    /// `cuMemHostUnregister`; errors as [`Memory::free_host`].
    pub fn unregister(&mut self, p: *mut c_void) -> Result<(), Result<CUresult, String>> {
        let at = p as usize;
        match self.pinned.get(&at) {
            Some(x) if x.registered => Self::idle(x, "cuMemHostUnregister", at).map_err(Err)?,
            _ => return Err(Ok(CUresult::CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)),
        }
        self.pinned.remove(&at);
        Ok(())
    }

    /// The page-locked host buffer holding all of `p..p + len`, counted as
    /// used by one more queued operation.
    pub fn use_pinned(&self, p: usize, len: usize) -> Option<PinnedUse> {
        let (&b, x) = self.pinned.range(..=p).next_back()?;
        if p.checked_add(len)? > b + x.len {
            return None;
        }
        x.pending.fetch_add(1, Ordering::AcqRel);
        Some(PinnedUse {
            read_only: x.read_only,
            pending: Arc::clone(&x.pending),
        })
    }

    /// What is still allocated, registered, created or reserved, if anything:
    /// at the end of a context, a leak of whoever made it.
    pub fn leftovers(&self) -> Option<String> {
        let pinned = self.pinned.values().filter(|x| !x.registered).count();
        let registered = self.pinned.len() - pinned;
        let counts = [
            (self.allocs.len(), "cuMemAlloc allocation(s)"),
            (pinned, "cuMemHostAlloc buffer(s)"),
            (registered, "host registration(s)"),
            (self.phys.len(), "cuMemCreate allocation(s)"),
            (self.reserved.len(), "reserved range(s)"),
        ];
        let left: Vec<String> = counts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        (!left.is_empty()).then(|| left.join(", "))
    }

    /// The primary context was destroyed: its allocations and page-locked
    /// buffers go (their addresses become inaccessible, so a later use
    /// faults) and its registrations are forgotten. Physical allocations,
    /// reservations and mappings are the device's and stay.
    pub fn destroy_context(&mut self) {
        for (_, a) in std::mem::take(&mut self.allocs) {
            // SAFETY: our own reservation and shadow, forgotten above.
            unsafe {
                let _ = munmap(a.va as *mut c_void, a.charged + HOST_PAGE);
                let _ = munmap(a.shadow as *mut c_void, a.charged);
            }
            self.used -= a.charged;
        }
        for (p, x) in std::mem::take(&mut self.pinned) {
            if !x.registered {
                // SAFETY: a buffer `host_alloc` mapped; it stays reserved
                // (inaccessible), so a use after the context's end faults.
                unsafe { back_to_reserved(p, round_up(x.len, HOST_PAGE).unwrap_or(x.len)) };
            }
        }
    }
}
