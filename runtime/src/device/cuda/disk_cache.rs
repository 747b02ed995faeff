//! Compiled kernel images kept on disk between processes.
//!
//! NVRTC takes seconds to build the merge kernels (13–17 s for
//! `lowrank_merge.cu` on a 2-core VM with NVRTC 13.0.88), and every process
//! that merges would pay that on its first merge. A built image is
//! therefore written to a cache folder and read back by later processes.
//!
//! An entry is found by a file name made from a hash of its key, but used
//! only when the whole key stored in the file equals the wanted one: the
//! program's name, NVRTC's version and library file (path, size and
//! modification time, so a patch release is another key), the options
//! (which name the target), every header's name and text, and the source. So a different source,
//! header, NVRTC or target never loads a stale image, whatever the hash.
//! The image's length and checksum are stored too: a truncated or damaged
//! file is a miss, compiled again and overwritten. Files are written under
//! a temporary name and renamed, so a reader never sees half a file, even
//! with two processes building at once. A folder keeps the [`KEEP`] most
//! recently used entries of each program and target (loading an entry
//! marks it used).
//!
//! The folder ([`cache_dir`]): `$OFFLOAD_KERNEL_CACHE` when set (`off`,
//! `0` or empty turns the cache off), else `$XDG_CACHE_HOME/offload/kernels`,
//! else `$HOME/.cache/offload/kernels`. It is created readable and writable
//! by its owner only, and used only while it is a folder owned by this
//! process's user that nobody else may write to (a kernel image is code
//! the GPU runs: a folder others can write to would let them plant one).
//! A folder that cannot be created, written or trusted never fails a
//! compilation: the image is used, and the report ([`DiskCache::NotStored`])
//! says why it was not kept.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::nvrtc::Target;

/// The environment variable that names the cache folder, or turns the cache off.
pub const ENV: &str = "OFFLOAD_KERNEL_CACHE";

/// What the disk cache did for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskCache {
    /// No cache folder: turned off by `OFFLOAD_KERNEL_CACHE`, or neither an
    /// absolute `XDG_CACHE_HOME` nor `HOME` is set; or the image was built
    /// fresh on purpose.
    Off,
    /// Read from this file; NVRTC did not compile.
    Loaded(PathBuf),
    /// Compiled, then written to this file.
    Stored(PathBuf),
    /// Compiled; writing this file failed (the error).
    NotStored {
        /// The file that could not be written.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

/// The cache folder for the given values of `OFFLOAD_KERNEL_CACHE`,
/// `XDG_CACHE_HOME` and `HOME` (see the module docs); `None` when off.
pub fn resolve_dir(
    offload: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(v) = offload {
        let off = v.is_empty() || v == "0" || v.eq_ignore_ascii_case("off");
        return (!off).then(|| PathBuf::from(v));
    }
    // The XDG spec ignores a relative XDG_CACHE_HOME.
    if let Some(x) = xdg.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Some(x.join("offload").join("kernels"));
    }
    home.filter(|h| !h.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("offload")
            .join("kernels")
    })
}

/// The cache folder of this process's environment (see the module docs).
pub fn cache_dir() -> Option<PathBuf> {
    resolve_dir(
        std::env::var_os(ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// Everything an image is built from; equal keys build equal images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The program's name.
    pub name: String,
    /// What is built (also named by the options).
    pub target: Target,
    /// NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// Which NVRTC library file built it (e.g. its path, size and
    /// modification time): NVRTC says only its major and minor version.
    pub nvrtc_library: String,
    /// NVRTC's options.
    pub options: Vec<String>,
    /// The headers given to NVRTC, `(include name, text)`.
    pub headers: Vec<(String, String)>,
    /// The source.
    pub source: String,
}

impl Key {
    /// The key as bytes: every part length-prefixed, so no two keys share one.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.source.len() + 4096);
        let mut put = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        put(self.name.as_bytes());
        put(self.target.to_string().as_bytes());
        put(format!("{}.{}", self.nvrtc_version.0, self.nvrtc_version.1).as_bytes());
        put(self.nvrtc_library.as_bytes());
        put(&(self.options.len() as u64).to_le_bytes());
        for o in &self.options {
            put(o.as_bytes());
        }
        put(&(self.headers.len() as u64).to_le_bytes());
        for (n, t) in &self.headers {
            put(n.as_bytes());
            put(t.as_bytes());
        }
        put(self.source.as_bytes());
        out
    }

    /// The entry's file name: the program's name (letters, digits, `.` and
    /// `_` kept, anything else made `_`), the target, a hash of the whole
    /// key, e.g. `lowrank_merge.cu-sm_90-0123456789abcdef.bin`.
    pub fn file_name(&self) -> String {
        format!("{}{:016x}.bin", self.family(), fnv1a(&self.encode()))
    }

    /// The start of the file names of every entry for this program and
    /// target: the program's name, then the target, each followed by `-`.
    fn family(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let target = match self.target {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        };
        format!("{name}-{target}-")
    }

    /// Whether `file` names an entry of this program and target: the
    /// family, 16 hexadecimal digits, `.bin`.
    fn is_family_entry(&self, file: &str) -> bool {
        file.strip_prefix(&self.family())
            .and_then(|r| r.strip_suffix(".bin"))
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// FNV-1a, 64 bits: names files and checks images against damage (not
/// against tampering: that is what [`trusted`] is for).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The first bytes of every entry; the last two are the format's version.
const MAGIC: &[u8; 16] = b"offload-kernel\x00\x02";
const HEADER: usize = MAGIC.len() + 3 * 8;

/// The largest entry file read (images are about 1 MiB).
const MAX_ENTRY: u64 = 256 << 20;

/// Whether `dir` may hold entries: a folder owned by this process's user
/// that neither its group nor others may write to. The error says why not.
pub fn trusted(dir: &Path) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    let untrusted = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("kernel cache folder {} {why}", dir.display()),
        ))
    };
    if !meta.is_dir() {
        return untrusted("is not a folder".into());
    }
    let me = rustix::process::getuid().as_raw();
    if meta.uid() != me {
        return untrusted(format!("belongs to user {}, not {me}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return untrusted(format!(
            "may be written by others (mode {:o})",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// The image stored for `key` in `dir`, if `dir` is [`trusted`] and holds
/// a regular file for `key` whose stored key is `key` and whose image is
/// whole. Any other file (absent, unreadable, not a regular file, another
/// key, truncated, damaged) is `None`. A hit marks the entry used (its
/// modification time), for [`KEEP`].
pub fn load(dir: &Path, key: &Key) -> Option<(PathBuf, Vec<u8>)> {
    trusted(dir).ok()?;
    let path = dir.join(key.file_name());
    let meta = fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > MAX_ENTRY {
        return None;
    }
    let data = fs::read(&path).ok()?;
    let want = key.encode();
    let rest = data.strip_prefix(MAGIC.as_slice())?;
    let field = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            rest.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let key_len = usize::try_from(field(0)?).ok()?;
    let image_len = usize::try_from(field(1)?).ok()?;
    let sum = field(2)?;
    let body = data.get(HEADER..)?;
    if key_len != want.len() || body.len() != key_len.checked_add(image_len)? {
        return None;
    }
    let (stored_key, image) = body.split_at(key_len);
    if stored_key != want.as_slice() || image.is_empty() || fnv1a(image) != sum {
        return None;
    }
    // Best effort: a folder this process may only read still serves.
    let _ = fs::File::options()
        .append(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    Some((path, image.to_vec()))
}

/// How many entries of one program and target a folder keeps: the most
/// recently used ones, so that a few builds of Offload used in turn do not
/// compile again, while old sources do not pile up.
pub const KEEP: usize = 4;

/// Writes `image` for `key` into `dir`, replacing any entry of that name;
/// returns the file. `dir` is created (readable and writable by its owner
/// only) if missing, and must then be [`trusted`]. The file appears whole
/// or not at all (written under a new temporary name, then renamed). Then
/// removes the entries of the same program and target beyond the [`KEEP`]
/// most recently used (by modification time).
pub fn store(dir: &Path, key: &Key, image: &[u8]) -> io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    trusted(dir)?;
    let path = dir.join(key.file_name());
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}-{}-{nanos}.tmp",
        key.file_name(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let k = key.encode();
    let write = || -> io::Result<()> {
        let mut f = fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&(k.len() as u64).to_le_bytes())?;
        f.write_all(&(image.len() as u64).to_le_bytes())?;
        f.write_all(&fnv1a(image).to_le_bytes())?;
        f.write_all(&k)?;
        f.write_all(image)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().inspect_err(|e| {
        // A name taken by someone else is theirs to remove.
        if e.kind() != io::ErrorKind::AlreadyExists {
            let _ = fs::remove_file(&tmp);
        }
    })?;
    prune(dir, key, &path);
    Ok(path)
}

/// Removes the entries of `key`'s program and target beyond the [`KEEP`]
/// most recently used (by modification time), never `keep` itself; best
/// effort. Other files are left alone.
fn prune(dir: &Path, key: &Key, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| key.is_family_entry(&e.file_name().to_string_lossy()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    // Newest first; the one just written always stays.
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    found.retain(|(_, p)| p != keep);
    for (_, p) in found.into_iter().skip(KEEP - 1) {
        let _ = fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            name: "lowrank_merge.cu".into(),
            target: Target::Cubin(90),
            nvrtc_version: (13, 0),
            nvrtc_library: "/usr/lib/libnvrtc.so.13:1000:1700000000".into(),
            options: vec!["--gpu-architecture=sm_90".into()],
            headers: vec![("cuda_fp16.h".into(), "struct __half {};".into())],
            source: "extern \"C\" __global__ void k() {}".into(),
        }
    }

    /// A fresh folder under the system's temporary folder.
    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "offload-disk-cache-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_stored_image_loads_back_whole() {
        let d = dir("roundtrip");
        let k = key();
        assert_eq!(load(&d, &k), None, "an empty cache has nothing");
        let image: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = store(&d, &k, &image).unwrap();
        assert_eq!(path, d.join(k.file_name()));
        assert_eq!(load(&d, &k), Some((path.clone(), image.clone())));
        // Overwriting replaces the entry; no temporary file is left.
        store(&d, &k, b"another image").unwrap();
        assert_eq!(load(&d, &k).unwrap().1, b"another image");
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from(k.file_name())]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn any_difference_in_the_key_is_a_miss() {
        let d = dir("keys");
        let k = key();
        store(&d, &k, b"image for k").unwrap();
        let mut others = Vec::new();
        let mut o = k.clone();
        o.source.push(' ');
        others.push(o);
        let mut o = k.clone();
        o.headers[0].1.push(' ');
        others.push(o);
        let mut o = k.clone();
        o.nvrtc_version = (13, 1);
        others.push(o);
        let mut o = k.clone();
        o.nvrtc_library = "/usr/lib/libnvrtc.so.13:1001:1700000000".into();
        others.push(o);
        let mut o = k.clone();
        o.target = Target::Cubin(80);
        o.options = vec!["--gpu-architecture=sm_80".into()];
        others.push(o);
        let mut o = k.clone();
        o.options.push("-lineinfo".into());
        others.push(o);
        for o in &others {
            assert_ne!(o.encode(), k.encode());
            assert_eq!(load(&d, o), None, "{o:?}");
            // Even a file under the other key's name holding k's entry (a
            // hash collision) is refused: the stored key is compared whole.
            fs::copy(d.join(k.file_name()), d.join(o.file_name())).unwrap();
            assert_eq!(load(&d, o), None, "{o:?}");
        }
        assert_eq!(load(&d, &k).unwrap().1, b"image for k");
        // Parts are length-prefixed: moving a byte between two parts is another key.
        let mut a = k.clone();
        a.headers = vec![("ab".into(), "c".into())];
        let mut b = k.clone();
        b.headers = vec![("a".into(), "bc".into())];
        assert_ne!(a.encode(), b.encode());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_truncated_or_damaged_file_is_a_miss() {
        let d = dir("damage");
        let k = key();
        let image = vec![0x5au8; 4096];
        let path = store(&d, &k, &image).unwrap();
        let whole = fs::read(&path).unwrap();
        // Every truncation, from nothing to one byte short.
        for cut in [
            0,
            1,
            15,
            16,
            HEADER - 1,
            HEADER,
            HEADER + 10,
            whole.len() - 1,
        ] {
            fs::write(&path, &whole[..cut]).unwrap();
            assert_eq!(load(&d, &k), None, "cut at {cut}");
        }
        // A flipped byte in the image, in the key, in the magic; a byte too many.
        for at in [whole.len() - 1, HEADER + 3, 2] {
            let mut bad = whole.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert_eq!(load(&d, &k), None, "flip at {at}");
        }
        let mut long = whole.clone();
        long.push(0);
        fs::write(&path, &long).unwrap();
        assert_eq!(load(&d, &k), None);
        // Storing again repairs it.
        store(&d, &k, &image).unwrap();
        assert_eq!(load(&d, &k).unwrap().1, image);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unwritable_folder_is_an_error_not_a_panic() {
        let d = dir("unwritable");
        fs::create_dir_all(&d).unwrap();
        // A file where the folder should be: create_dir_all fails, whoever runs the test.
        let blocked = d.join("not-a-folder");
        fs::write(&blocked, b"x").unwrap();
        let e = store(&blocked.join("kernels"), &key(), b"image").unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists
            ),
            "{e:?}"
        );
        assert_eq!(load(&blocked.join("kernels"), &key()), None);
        fs::remove_dir_all(&d).unwrap();
    }

    /// Sets `path`'s modification time to `secs` seconds after an hour ago.
    fn touch(path: &Path, secs: u64) {
        let t = SystemTime::now() - std::time::Duration::from_secs(3600 - secs);
        fs::File::options()
            .append(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn a_folder_keeps_the_most_recently_used_entries_of_each_program_and_target() {
        let d = dir("prune");
        let versions: Vec<Key> = (0..KEEP + 3)
            .map(|i| {
                let mut k = key();
                k.source = format!("// version {i}\n{}", k.source);
                k
            })
            .collect();
        // Another target and another program share the folder, and files
        // that only look like entries: none of them is pruned.
        let mut sm80 = key();
        sm80.target = Target::Cubin(80);
        let mut other = key();
        other.name = "offload_convert.cu".into();
        store(&d, &sm80, b"sm_80").unwrap();
        store(&d, &other, b"other").unwrap();
        let family = key().family();
        let strangers = [
            format!("{family}notahash.bin"),
            format!("{family}0123456789abcdef.bin.tmp"),
            format!(".{family}0123456789abcdef.bin.1-2-3.tmp"),
        ];
        for n in &strangers {
            fs::write(d.join(n), b"x").unwrap();
            touch(&d.join(n), 0);
        }
        // Version i stored at second i (explicit times, whatever the file
        // system's resolution); the one just stored is the newest anyway.
        for (i, k) in versions.iter().enumerate() {
            let p = store(&d, k, format!("image {i}").as_bytes()).unwrap();
            touch(&p, 10 + i as u64);
        }
        for (i, k) in versions.iter().enumerate() {
            assert_eq!(
                load(&d, k).is_some(),
                i >= versions.len() - KEEP,
                "version {i}"
            );
        }
        assert_eq!(load(&d, &sm80).unwrap().1, b"sm_80");
        assert_eq!(load(&d, &other).unwrap().1, b"other");
        for n in &strangers {
            assert!(d.join(n).exists(), "{n} was removed");
        }
        assert_eq!(
            fs::read_dir(&d).unwrap().count(),
            KEEP + 2 + strangers.len()
        );
        // Loading marks an entry used: the oldest kept one survives the
        // next store once loaded (above), the second oldest goes.
        let oldest_kept = versions.len() - KEEP;
        for (i, k) in versions.iter().enumerate().skip(oldest_kept + 1) {
            touch(&d.join(k.file_name()), 100 + i as u64);
        }
        load(&d, &versions[oldest_kept]).unwrap();
        store(&d, &versions[0], b"again").unwrap();
        assert_eq!(load(&d, &versions[0]).unwrap().1, b"again");
        assert!(load(&d, &versions[oldest_kept]).is_some());
        assert!(load(&d, &versions[oldest_kept + 1]).is_none());
        assert_eq!(
            fs::read_dir(&d).unwrap().count(),
            KEEP + 2 + strangers.len()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_folder_others_may_write_to_is_neither_read_nor_written() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("trust");
        let k = key();
        let path = store(&d, &k, b"image").unwrap();
        // Created for its owner only.
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        assert!(trusted(&d).is_ok());
        for mode in [0o770, 0o722, 0o777] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load(&d, &k), None, "{mode:o}");
            let e = store(&d, &k, b"planted").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{mode:o}");
            assert!(e.to_string().contains("may be written by others"), "{e}");
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(load(&d, &k).unwrap(), (path.clone(), b"image".to_vec()));
        // Not a folder; an entry that is a folder, not a file.
        let file = d.join("plain-file");
        fs::write(&file, b"x").unwrap();
        assert!(trusted(&file).is_err());
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert_eq!(load(&d, &k), None);
        assert!(store(&d, &k, b"image").is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_folder_follows_the_environment() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            resolve_dir(s("/x/k"), s("/xdg"), s("/home/u")),
            Some(PathBuf::from("/x/k"))
        );
        for off in ["off", "OFF", "0", ""] {
            assert_eq!(
                resolve_dir(s(off), s("/xdg"), s("/home/u")),
                None,
                "{off:?}"
            );
        }
        assert_eq!(
            resolve_dir(None, s("/xdg"), s("/home/u")),
            Some(PathBuf::from("/xdg/offload/kernels"))
        );
        // A relative XDG_CACHE_HOME is ignored, as the XDG spec says.
        assert_eq!(
            resolve_dir(None, s("rel"), s("/home/u")),
            Some(PathBuf::from("/home/u/.cache/offload/kernels"))
        );
        assert_eq!(resolve_dir(None, None, None), None);
        assert_eq!(resolve_dir(None, None, s("")), None);
    }

    #[test]
    fn file_names_are_plain_and_name_the_target() {
        let mut k = key();
        k.name = "../we ird/na-me.cu".into();
        let n = k.file_name();
        assert!(n.starts_with(".._we_ird_na_me.cu-sm_90-"), "{n}");
        assert!(k.is_family_entry(&n));
        assert!(!n.contains('/'));
        k.target = Target::Ptx(90);
        assert!(k.file_name().contains("-compute_90-"));
    }
}
