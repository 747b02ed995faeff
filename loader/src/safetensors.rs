//! Reading safetensors files: strict header validation and checked
//! positional reads of tensor bytes.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n`
//! bytes of JSON, then the data section. The JSON maps tensor names to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
//! the data section) plus an optional `"__metadata__"` map of strings.
//!
//! [`parse_header`] validates everything before any tensor is handed out:
//! the header length lies within the file (and under [`MAX_HEADER_LEN`]),
//! the JSON is well-formed with no key repeated in an object (a parser
//! would silently keep one of the two values), every dtype is known, every
//! range lies inside the data section, no two ranges overlap, shape × dtype
//! size equals the range length, and no arithmetic overflows: not even the
//! product of the non-zero dimensions of a tensor with no elements. Every
//! error names the file, the tensor and the offending numbers.
//!
//! [`Checkpoint`] opens a file or a folder: shard sets (named
//! `-NNNNN-of-NNNNN` or listed by a `*.safetensors.index.json`) are one
//! model, other top-level files models of their own, subfolders diffusers
//! components; [`variant_of`] knows the variant tags (`fp16`, `bf16`, ...)
//! of file names.
//!
//! The header is read with plain reads (no mmap), and tensor bytes with
//! `read_exact_at` into the caller's buffer, so a file truncated after it
//! was opened gives [`LoaderError::Truncated`], never a SIGBUS.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{LoaderError, Result};

/// Largest header accepted, in bytes (the limit the reference
/// implementation uses). Real headers are well under 10 MB.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor as described by a file's header: where its bytes are and how
/// to interpret them. This is also the tensor reference that model layouts
/// hand to the runtime ([`crate::layout::TensorRef`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// Name as it appears in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub data_offset: u64,
    /// Length in bytes (= element count × dtype size, validated).
    pub len: u64,
    /// Index of the file that holds the tensor, in the owning
    /// [`Checkpoint`] (or layout) file list; 0 for a lone file.
    pub file: usize,
}

impl TensorInfo {
    /// Number of elements (the product of the shape; 1 for a scalar).
    /// Cannot overflow for a parsed tensor (validated against the byte
    /// length); for a description built by hand it saturates at
    /// `u64::MAX`.
    pub fn numel(&self) -> u64 {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .unwrap_or(u64::MAX)
    }

    /// Absolute byte range in the file.
    pub fn byte_range(&self) -> Range<u64> {
        self.data_offset..self.data_offset.saturating_add(self.len)
    }
}

/// A validated header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Length of the JSON header in bytes.
    pub header_len: u64,
    /// Absolute offset of the data section (`8 + header_len`).
    pub data_start: u64,
    /// Length of the data section (file length − `data_start`).
    pub data_len: u64,
    /// The `__metadata__` map (empty if absent).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in the order of their data offsets (ties by name).
    pub tensors: Vec<TensorInfo>,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the 8-byte header length from the start of a file's bytes and
/// checks it against the file length and [`MAX_HEADER_LEN`]. Returns the
/// header length.
pub fn check_header_len(path: &Path, first8: &[u8], file_len: u64) -> Result<u64> {
    if file_len < 8 || first8.len() < 8 {
        return Err(LoaderError::FileTooShort {
            path: path.to_owned(),
            file_len,
        });
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&first8[..8]);
    let header_len = u64::from_le_bytes(n);
    let available = file_len - 8;
    if header_len > available {
        return Err(LoaderError::HeaderLenOutOfRange {
            path: path.to_owned(),
            header_len,
            available,
            file_len,
        });
    }
    if header_len > MAX_HEADER_LEN {
        return Err(LoaderError::HeaderTooLarge {
            path: path.to_owned(),
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    Ok(header_len)
}

/// Parses and validates a whole safetensors file held in memory (the
/// header length, the header, and the ranges against the file length).
/// `file_index` goes into every [`TensorInfo::file`].
pub fn parse_file_bytes(path: &Path, bytes: &[u8], file_index: usize) -> Result<Header> {
    let file_len = bytes.len() as u64;
    let header_len = check_header_len(path, bytes, file_len)?;
    // In range: checked against the slice length above.
    let json = &bytes[8..8 + header_len as usize];
    parse_header(path, json, file_len, file_index)
}

fn bad_entry(path: &Path, tensor: &str, problem: String) -> LoaderError {
    LoaderError::BadTensorEntry {
        path: path.to_owned(),
        tensor: tensor.to_owned(),
        problem,
    }
}

fn u64_array(path: &Path, tensor: &str, field: &str, v: Option<&Value>) -> Result<Vec<u64>> {
    let v = v.ok_or_else(|| bad_entry(path, tensor, format!("missing field `{field}`")))?;
    let arr = v.as_array().ok_or_else(|| {
        bad_entry(
            path,
            tensor,
            format!(
                "`{field}` is {}, expected an array of integers",
                json_kind(v)
            ),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64().ok_or_else(|| {
                bad_entry(
                    path,
                    tensor,
                    format!("`{field}`[{i}] is {x}, expected a non-negative integer below 2^64"),
                )
            })
        })
        .collect()
}

/// The first key that appears twice in one object of a well-formed JSON
/// text, with a description of that object (`the top-level object`,
/// `tensor `name``, `__metadata__`, `object `key``). JSON parsers keep one
/// of the two values silently; a safetensors header with a repeated tensor
/// name is ambiguous, so it is refused. Never panics, whatever the input.
pub fn duplicate_key(json: &[u8]) -> Option<(String, String)> {
    /// An object being walked: its keys so far (a short list, then a set),
    /// the key it is the value of, and its depth.
    struct Obj<'a> {
        small: Vec<Cow<'a, [u8]>>,
        big: HashSet<Cow<'a, [u8]>>,
        parent: Option<Cow<'a, [u8]>>,
        depth: usize,
        expect_key: bool,
    }
    impl<'a> Obj<'a> {
        /// Adds a key; `false` if the object already has it.
        fn add(&mut self, k: Cow<'a, [u8]>) -> bool {
            if !self.big.is_empty() {
                return self.big.insert(k);
            }
            if self.small.contains(&k) {
                return false;
            }
            self.small.push(k);
            if self.small.len() > 16 {
                self.big.extend(self.small.drain(..));
            }
            true
        }

        fn describe(&self) -> String {
            let parent = self.parent.as_ref().map(|p| String::from_utf8_lossy(p));
            match (self.depth, parent) {
                (0, _) => "the top-level object".to_owned(),
                (1, Some(k)) if k == "__metadata__" => "`__metadata__`".to_owned(),
                (1, Some(k)) => format!("tensor `{k}`"),
                (_, Some(k)) => format!("object `{k}`"),
                (_, None) => "a nested object".to_owned(),
            }
        }
    }
    // `None`: an array.
    let mut stack: Vec<Option<Obj<'_>>> = Vec::new();
    // The key whose value comes next (names a nested object).
    let mut last_key: Option<Cow<'_, [u8]>> = None;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => {
                let start = i;
                let mut escaped = false;
                i += 1;
                loop {
                    match json[i.min(json.len())..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')
                    {
                        Some(p) if json[i + p] == b'\\' => {
                            escaped = true;
                            i += p + 2;
                        }
                        Some(p) => {
                            i += p;
                            break;
                        }
                        None => {
                            i = json.len();
                            break;
                        }
                    }
                }
                let end = (i + 1).min(json.len());
                if let Some(Some(obj)) = stack.last_mut() {
                    if obj.expect_key {
                        let raw = &json[start.min(end)..end];
                        let key: Cow<'_, [u8]> = if escaped {
                            Cow::Owned(
                                serde_json::from_slice::<String>(raw)
                                    .map_or_else(|_| raw.to_vec(), String::into_bytes),
                            )
                        } else {
                            Cow::Borrowed(raw.get(1..raw.len().saturating_sub(1)).unwrap_or(&[]))
                        };
                        if !obj.add(key.clone()) {
                            return Some((
                                String::from_utf8_lossy(&key).into_owned(),
                                obj.describe(),
                            ));
                        }
                        obj.expect_key = false;
                        last_key = Some(key);
                    }
                }
                i += 1;
            }
            b'{' => {
                stack.push(Some(Obj {
                    small: Vec::new(),
                    big: HashSet::new(),
                    parent: last_key.take(),
                    depth: stack.len(),
                    expect_key: true,
                }));
                i += 1;
            }
            b'[' => {
                last_key = None;
                stack.push(None);
                i += 1;
            }
            b'}' | b']' => {
                last_key = None;
                stack.pop();
                i += 1;
            }
            b',' => {
                if let Some(Some(obj)) = stack.last_mut() {
                    obj.expect_key = true;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

/// Keys of every object of a JSON text, counted in one pass without
/// decoding them (repeats included). Never panics, whatever the input.
fn raw_key_count(json: &[u8]) -> usize {
    // Per open container: whether it is an object expecting a key.
    let mut stack: Vec<bool> = Vec::new();
    let mut count = 0;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                if let Some(expect) = stack.last_mut() {
                    if *expect {
                        count += 1;
                        *expect = false;
                    }
                }
                i += 1;
                while i < json.len() {
                    match json[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'{' => {
                stack.push(true);
                i += 1;
            }
            b'[' => {
                stack.push(false);
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' => {
                // Objects expect a key after a comma; arrays never do.
                if let Some(expect) = stack.last_mut() {
                    *expect = true;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    count
}

/// Keys of every object of a parsed JSON value.
fn value_key_count(v: &Value) -> usize {
    match v {
        Value::Object(m) => m.len() + m.values().map(value_key_count).sum::<usize>(),
        Value::Array(a) => a.iter().map(value_key_count).sum(),
        _ => 0,
    }
}

/// Validates the JSON header of a file of `file_len` bytes. `json` is the
/// header text (without the 8-byte length); `file_index` goes into every
/// [`TensorInfo::file`].
pub fn parse_header(path: &Path, json: &[u8], file_len: u64, file_index: usize) -> Result<Header> {
    let header_len = json.len() as u64;
    let data_start = header_len.checked_add(8).filter(|s| *s <= file_len).ok_or(
        LoaderError::HeaderLenOutOfRange {
            path: path.to_owned(),
            header_len,
            available: file_len.saturating_sub(8),
            file_len,
        },
    )?;
    let data_len = file_len - data_start;

    let value: Value = serde_json::from_slice(json).map_err(|e| LoaderError::HeaderJson {
        path: path.to_owned(),
        header_len,
        message: e.to_string(),
    })?;
    // The parser kept one value of a repeated key: a key count that differs
    // from the raw text's means a repeat; find and name it.
    if raw_key_count(json) != value_key_count(&value) {
        if let Some((key, within)) = duplicate_key(json) {
            return Err(LoaderError::DuplicateKey {
                path: path.to_owned(),
                key,
                within,
            });
        }
    }
    let Value::Object(map) = value else {
        return Err(LoaderError::HeaderNotObject {
            path: path.to_owned(),
            found: json_kind(&value),
        });
    };

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in &map {
        if name == "__metadata__" {
            let Value::Object(md) = entry else {
                return Err(LoaderError::BadMetadata {
                    path: path.to_owned(),
                    problem: format!("is {}, expected an object of strings", json_kind(entry)),
                });
            };
            for (k, v) in md {
                let Value::String(s) = v else {
                    return Err(LoaderError::BadMetadata {
                        path: path.to_owned(),
                        problem: format!("key `{k}` is {}, expected a string", json_kind(v)),
                    });
                };
                metadata.insert(k.clone(), s.clone());
            }
            continue;
        }
        let Value::Object(fields) = entry else {
            return Err(bad_entry(
                path,
                name,
                format!("entry is {}, expected an object", json_kind(entry)),
            ));
        };
        let dtype_v = fields
            .get("dtype")
            .ok_or_else(|| bad_entry(path, name, "missing field `dtype`".into()))?;
        let Value::String(dtype_s) = dtype_v else {
            return Err(bad_entry(
                path,
                name,
                format!("`dtype` is {}, expected a string", json_kind(dtype_v)),
            ));
        };
        let dtype = Dtype::from_name(dtype_s).ok_or_else(|| LoaderError::UnknownDtype {
            path: path.to_owned(),
            tensor: name.clone(),
            dtype: dtype_s.clone(),
        })?;
        let shape = u64_array(path, name, "shape", fields.get("shape"))?;
        let offsets = u64_array(path, name, "data_offsets", fields.get("data_offsets"))?;
        let [begin, end] = offsets[..] else {
            return Err(bad_entry(
                path,
                name,
                format!(
                    "`data_offsets` has {} elements {offsets:?}, expected 2",
                    offsets.len()
                ),
            ));
        };
        if begin > end {
            return Err(LoaderError::ReversedOffsets {
                path: path.to_owned(),
                tensor: name.clone(),
                begin,
                end,
            });
        }
        if end > data_len {
            return Err(LoaderError::OffsetsOutOfRange {
                path: path.to_owned(),
                tensor: name.clone(),
                begin,
                end,
                data_len,
            });
        }
        // The product of the non-zero dimensions (times the element size)
        // must fit in 64 bits even when another dimension is 0: code that
        // views a tensor as a matrix multiplies some dimensions and not
        // others, and must never overflow on a tensor this accepted.
        let nonzero = shape
            .iter()
            .filter(|d| **d != 0)
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64))
            .ok_or_else(|| LoaderError::ShapeOverflow {
                path: path.to_owned(),
                tensor: name.clone(),
                shape: shape.clone(),
                dtype,
            })?;
        let expected = if shape.contains(&0) { 0 } else { nonzero };
        let actual = end - begin;
        if expected != actual {
            return Err(LoaderError::SizeMismatch {
                path: path.to_owned(),
                tensor: name.clone(),
                shape,
                dtype,
                expected,
                actual,
                begin,
                end,
            });
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            // Cannot overflow: end <= data_len = file_len - data_start.
            data_offset: data_start + begin,
            len: actual,
            file: file_index,
        });
    }

    tensors.sort_by(|a, b| (a.data_offset, a.len, &a.name).cmp(&(b.data_offset, b.len, &b.name)));
    // Overlap: walk in offset order, remembering the non-empty range that
    // reaches furthest. Empty tensors occupy no bytes and overlap nothing.
    let mut furthest: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.len > 0) {
        if let Some(prev) = furthest {
            let prev_end = prev.data_offset + prev.len;
            if t.data_offset < prev_end {
                return Err(LoaderError::Overlap {
                    path: path.to_owned(),
                    first: prev.name.clone(),
                    first_begin: prev.data_offset - data_start,
                    first_end: prev_end - data_start,
                    second: t.name.clone(),
                    second_begin: t.data_offset - data_start,
                    second_end: t.data_offset + t.len - data_start,
                });
            }
        }
        if furthest.is_none_or(|p| t.data_offset + t.len > p.data_offset + p.len) {
            furthest = Some(t);
        }
    }

    Ok(Header {
        header_len,
        data_start,
        data_len,
        metadata,
        tensors,
    })
}

/// One open, validated safetensors file.
///
/// Holds the file handle open, so a file replaced (renamed over) after
/// opening keeps being read from the original; a file truncated after
/// opening gives [`LoaderError::Truncated`] on read.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    file_len: u64,
    /// Modification time at open, to notice a file rewritten in place.
    modified: Option<std::time::SystemTime>,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Opens and validates a file; its tensors get file index 0.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_indexed(path, 0)
    }

    /// Opens and validates a file whose tensors get file index `file_index`
    /// (its position in a [`Checkpoint`]).
    pub fn open_indexed(path: impl AsRef<Path>, file_index: usize) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let file = File::open(&path).map_err(|source| LoaderError::Open {
            path: path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| LoaderError::Open {
            path: path.clone(),
            source,
        })?;
        let file_len = meta.len();
        let modified = meta.modified().ok();
        let mut first8 = [0u8; 8];
        if file_len < 8 {
            return Err(LoaderError::FileTooShort { path, file_len });
        }
        let mut this = SafetensorsFile {
            path,
            file,
            file_len,
            modified,
            header: Header {
                header_len: 0,
                data_start: 8,
                data_len: 0,
                metadata: BTreeMap::new(),
                tensors: Vec::new(),
            },
            by_name: HashMap::new(),
        };
        this.read_at("header length", 0, &mut first8)?;
        let header_len = check_header_len(&this.path, &first8, file_len)?;
        // header_len <= MAX_HEADER_LEN, so this allocation is bounded.
        let mut json = vec![0u8; header_len as usize];
        this.read_at("header", 8, &mut json)?;
        this.header = parse_header(&this.path, &json, file_len, file_index)?;
        this.by_name = this
            .header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(this)
    }

    /// Path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The validated header (lengths, metadata, tensors).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The `__metadata__` map (empty if absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// Tensors in the order of their data offsets.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The tensor with this name, if any.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The tensor with this name, or [`LoaderError::TensorNotFound`].
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name).ok_or_else(|| LoaderError::TensorNotFound {
            path: self.path.clone(),
            tensor: name.to_owned(),
        })
    }

    fn read_at(&self, what: &str, offset: u64, dst: &mut [u8]) -> Result<()> {
        match self.file.read_exact_at(dst, offset) {
            // The bytes are the model's only if the file is still the one
            // opened: a rewrite in place changes its length or its time.
            Ok(()) => match self.file.metadata() {
                Ok(m) if m.len() != self.file_len || m.modified().ok() != self.modified => {
                    Err(LoaderError::Changed {
                        path: self.path.clone(),
                        what: what.to_owned(),
                        file_len_at_open: self.file_len,
                        file_len_now: m.len(),
                    })
                }
                _ => Ok(()),
            },
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(LoaderError::Truncated {
                path: self.path.clone(),
                what: what.to_owned(),
                offset,
                len: dst.len() as u64,
                file_len_at_open: self.file_len,
                file_len_now: self.file.metadata().map(|m| m.len()).unwrap_or(0),
            }),
            Err(source) => Err(LoaderError::Io {
                path: self.path.clone(),
                what: what.to_owned(),
                offset,
                len: dst.len() as u64,
                source,
            }),
        }
    }

    /// Reads the whole tensor `name` into `dst`, whose length must equal
    /// the tensor's byte length.
    pub fn read_tensor_into(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let t = self.tensor(name)?;
        if dst.len() as u64 != t.len {
            return Err(LoaderError::BufferSize {
                path: self.path.clone(),
                tensor: t.name.clone(),
                len: t.len,
                dst_len: dst.len() as u64,
            });
        }
        self.read_info_range_into(t, 0, dst)
    }

    /// Reads `dst.len()` bytes of tensor `name` starting `offset` bytes into
    /// the tensor (for chunked reads through a staging buffer). The range
    /// must lie within the tensor.
    pub fn read_tensor_range_into(&self, name: &str, offset: u64, dst: &mut [u8]) -> Result<()> {
        let t = self.tensor(name)?;
        self.read_info_range_into(t, offset, dst)
    }

    /// As [`Self::read_tensor_range_into`], for a tensor description taken
    /// from this file's header (the name is looked up again to make sure
    /// the description matches this file).
    pub fn read_info_range_into(&self, t: &TensorInfo, offset: u64, dst: &mut [u8]) -> Result<()> {
        let own = self.tensor(&t.name)?;
        let what = format!("tensor `{}`", t.name);
        let len = dst.len() as u64;
        let start = own.data_offset.checked_add(offset);
        let stop = start.and_then(|s| s.checked_add(len));
        match (start, stop) {
            (Some(s), Some(e)) if e <= own.data_offset + own.len && own == t => {
                self.read_at(&what, s, dst)
            }
            _ => Err(LoaderError::ReadOutOfRange {
                path: self.path.clone(),
                what,
                offset: own.data_offset.saturating_add(offset),
                len,
                begin: own.data_offset,
                end: own.data_offset + own.len,
            }),
        }
    }

    /// Reads `dst.len()` bytes at absolute file offset `offset`, which must
    /// lie within the data section.
    pub fn read_range_into(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len() as u64;
        let begin = self.header.data_start;
        let end = self.file_len;
        match offset.checked_add(len) {
            Some(stop) if offset >= begin && stop <= end => {
                self.read_at("data section", offset, dst)
            }
            _ => Err(LoaderError::ReadOutOfRange {
                path: self.path.clone(),
                what: "data section".into(),
                offset,
                len,
                begin,
                end,
            }),
        }
    }

    /// Reads tensor `name` into a new buffer.
    pub fn read_tensor_vec(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensor(name)?;
        let mut buf = vec![0u8; t.len as usize];
        self.read_info_range_into(t, 0, &mut buf)?;
        Ok(buf)
    }
}

/// A group of files opened together: one file, a folder of shards, a
/// folder of several models, or a diffusers-style folder whose subfolders
/// (`unet/`, `vae/`, ...) each hold a group of shards.
///
/// Tensor names are unique within a group (a subfolder, or one model of a
/// folder that holds several); the same name may appear in two groups
/// (e.g. `text_encoder/` and `text_encoder_2/`).
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Group name of each file: `None` for top-level files, else the
    /// subfolder name.
    file_groups: Vec<Option<String>>,
    /// Model of each top-level file when the folder holds several models
    /// (see [`Checkpoint::open`]); `None` otherwise.
    file_units: Vec<Option<String>>,
    index: HashMap<(Option<String>, String), (usize, usize)>,
}

/// How to open a folder.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Which variant to take when a folder holds several
    /// (`diffusion_pytorch_model.fp16.safetensors` has variant `fp16`; see
    /// [`VARIANT_TAGS`]). `None`, or a variant a folder does not have: the
    /// files without a variant, or the only variant present.
    pub variant: Option<String>,
}

/// Variant tags recognised in file names (`model.fp16.safetensors`), as
/// diffusers and transformers write them. Any other dotted suffix is part
/// of the model's name (`sd_xl_base_1.0.safetensors` is no variant `0`).
pub const VARIANT_TAGS: &[&str] = &[
    "fp16", "bf16", "fp32", "fp8", "ema", "non_ema", "non-ema", "noema",
];

fn known_tag(tag: &str) -> bool {
    VARIANT_TAGS.iter().any(|t| t.eq_ignore_ascii_case(tag))
}

/// `-NNNNN-of-NNNNN` at the end of `stem`: (stem before it, total).
fn split_shard_suffix(stem: &str) -> Option<(&str, u64)> {
    let (head, total) = stem.rsplit_once("-of-")?;
    let (base, part) = head.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(part) || !digits(total) || base.is_empty() {
        return None;
    }
    Some((base, total.parse().ok()?))
}

/// The variant tag of a safetensors file name: `model.fp16.safetensors` →
/// `Some("fp16")`, `model.fp16-00001-of-00002.safetensors` → `Some("fp16")`,
/// `model-00001-of-00002.fp16.safetensors` → `Some("fp16")`,
/// `model-00001-of-00002.safetensors` → `None`. Only the tags of
/// [`VARIANT_TAGS`] are variants: `sd_xl_base_1.0.safetensors` → `None`.
pub fn variant_of(file_name: &str) -> Option<String> {
    let stem = file_name.strip_suffix(".safetensors")?;
    let (_, last) = stem.rsplit_once('.')?;
    let tag = match split_shard_suffix(last) {
        Some((t, _)) => t,
        None => last,
    };
    known_tag(tag).then(|| tag.to_owned())
}

/// How a top-level file belongs to a shard set: `model-00001-of-00002`
/// (also with a variant, `model.fp16-00001-of-00002` or
/// `model-00001-of-00002.fp16`) → (`model` with the variant, total).
fn shard_set_of(file_name: &str) -> Option<(String, u64)> {
    let stem = file_name.strip_suffix(".safetensors")?;
    if let Some((base, total)) = split_shard_suffix(stem) {
        return Some((base.to_owned(), total));
    }
    // `model-00001-of-00002.fp16`: the variant after the shard suffix.
    let (head, tag) = stem.rsplit_once('.')?;
    if !known_tag(tag) {
        return None;
    }
    let (base, total) = split_shard_suffix(head)?;
    Some((format!("{base}.{tag}"), total))
}

fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| LoaderError::Open {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| LoaderError::Open {
            path: dir.to_owned(),
            source,
        })?;
        let p = entry.path();
        let keep = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.') && keep(n));
        if keep && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    list_dir(dir, |n| n.ends_with(".safetensors"))
}

/// `X.safetensors.index.json` → (`X`, `None`); `X.safetensors.index.TAG.json`
/// → (`X`, `Some(TAG)`) for a known variant tag.
fn index_name(file_name: &str) -> Option<(&str, Option<String>)> {
    let (base, rest) = file_name.split_once(".safetensors.index.")?;
    if base.is_empty() {
        return None;
    }
    if rest == "json" {
        return Some((base, None));
    }
    let tag = rest.strip_suffix(".json")?;
    known_tag(tag).then(|| (base, Some(tag.to_owned())))
}

/// The files a `*.safetensors.index.json` weight map names, in name order.
/// Each must be a plain file name in the index's folder that exists.
pub fn index_files(index: &Path) -> Result<Vec<PathBuf>> {
    let err = |problem: String| LoaderError::ShardIndex {
        path: index.to_owned(),
        problem,
    };
    let text = std::fs::read(index).map_err(|source| LoaderError::Open {
        path: index.to_owned(),
        source,
    })?;
    let v: Value =
        serde_json::from_slice(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("no `weight_map` object (tensor name → file name)".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names = std::collections::BTreeSet::new();
    for (tensor, f) in map {
        let f = f.as_str().ok_or_else(|| {
            err(format!(
                "`weight_map` entry `{tensor}` is {}, expected a file name",
                json_kind(f)
            ))
        })?;
        names.insert(f.to_owned());
    }
    if names.is_empty() {
        return Err(err("`weight_map` is empty".into()));
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if n.is_empty() || n.contains('/') || n.contains('\\') || n == "." || n == ".." {
            return Err(err(format!(
                "`weight_map` names `{n}`, expected a file name in {}",
                dir.display()
            )));
        }
        let p = dir.join(&n);
        if !p.is_file() {
            return Err(err(format!(
                "`weight_map` names `{n}`, which is not a file in {}",
                dir.display()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

/// The files of one variant: the one asked for, else the only one, else
/// the files without a variant. Returns the variant chosen and its files.
fn choose_variant(
    dir: &Path,
    files: Vec<PathBuf>,
    want: Option<&str>,
) -> Result<(Option<String>, Vec<PathBuf>)> {
    let mut groups: BTreeMap<Option<String>, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        let v = f.file_name().and_then(|n| n.to_str()).and_then(variant_of);
        groups.entry(v).or_default().push(f);
    }
    if let Some(want) = want {
        if let Some(g) = groups.remove(&Some(want.to_owned())) {
            return Ok((Some(want.to_owned()), g));
        }
    }
    if groups.len() <= 1 {
        return Ok(groups.into_iter().next().unwrap_or_default());
    }
    if let Some(g) = groups.remove(&None) {
        return Ok((None, g));
    }
    Err(LoaderError::AmbiguousVariant {
        path: dir.to_owned(),
        variants: groups
            .keys()
            .map(|k| k.clone().unwrap_or_else(|| "(none)".into()))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The models of one folder's safetensors files (of the chosen variant):
/// each shard set named by an index's weight map, each other shard set
/// (`-NNNNN-of-NNNNN`), each other file on its own. `(name, files)` in name
/// order, with whether an index named them; empty if the folder has no
/// safetensors files.
fn folder_models(dir: &Path, want: Option<&str>) -> Result<Vec<(String, Vec<PathBuf>, bool)>> {
    let files = list_safetensors(dir)?;
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let (variant, mut rest) = choose_variant(dir, files, want)?;
    let mut models: Vec<(String, Vec<PathBuf>, bool)> = Vec::new();
    let indexes = list_dir(dir, |n| index_name(n).is_some_and(|(_, v)| v == variant))?;
    for idx in indexes {
        let base = idx
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(index_name)
            .map_or_else(String::new, |(b, _)| b.to_owned());
        let named = index_files(&idx)?;
        rest.retain(|p| !named.contains(p));
        models.push((base, named, true));
    }
    let mut shard_sets: BTreeMap<(String, u64), Vec<PathBuf>> = BTreeMap::new();
    for p in rest {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        match shard_set_of(&name) {
            Some(key) => shard_sets.entry(key).or_default().push(p),
            None => {
                let stem = name
                    .strip_suffix(".safetensors")
                    .unwrap_or(&name)
                    .to_owned();
                models.push((stem, vec![p], false));
            }
        }
    }
    models.extend(
        shard_sets
            .into_iter()
            .map(|((base, _), files)| (base, files, false)),
    );
    models.sort();
    // Unique names (a `model.safetensors` beside `model-0000N-of-...`).
    let mut seen = HashSet::new();
    for (name, _, _) in &mut models {
        let mut k = 2;
        let base = name.clone();
        while !seen.insert(name.clone()) {
            *name = format!("{base}~{k}");
            k += 1;
        }
    }
    Ok(models)
}

/// One set of files opened as a unit: its subfolder (component group), its
/// model name among several top-level models, and its files.
type Unit = (Option<String>, Option<String>, Vec<PathBuf>);

impl Checkpoint {
    /// Opens a file, a folder, or a diffusers folder, with default options.
    ///
    /// A folder with safetensors files at the top holds one or more models:
    /// the files a `*.safetensors.index.json` weight map names (only those)
    /// are the shards of one model, files named `NAME-NNNNN-of-NNNNN` are
    /// the shards of model `NAME`, and every other file is a model of its
    /// own (a FLUX repository's `flux1-dev.safetensors` and `ae.safetensors`
    /// are a transformer and a VAE, not one model). A folder without
    /// safetensors at the top is a diffusers folder: one group per
    /// subfolder that holds some (all its files, or those its index names).
    /// Where files come in variants (`model.fp16.safetensors`), one variant
    /// is taken (see [`OpenOptions::variant`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// As [`Checkpoint::open`], with options.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| LoaderError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Self::from_units(path, vec![(None, None, vec![path.to_owned()])]);
        }
        let want = opts.variant.as_deref();
        let top = folder_models(path, want)?;
        if !top.is_empty() {
            let several = top.len() > 1;
            let units = top
                .into_iter()
                .map(|(name, files, _)| (None, several.then_some(name), files))
                .collect();
            return Self::from_units(path, units);
        }
        let rd = std::fs::read_dir(path).map_err(|source| LoaderError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut subdirs = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|source| LoaderError::Open {
                path: path.to_owned(),
                source,
            })?;
            let p = entry.path();
            if p.is_dir() {
                if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                    if !name.starts_with('.') {
                        subdirs.push((name.to_owned(), p));
                    }
                }
            }
        }
        subdirs.sort();
        let mut units = Vec::new();
        for (name, dir) in subdirs {
            // A component's folder is one model: the files its index
            // names if it has one, else all of them.
            let models = folder_models(&dir, want)?;
            let indexed = models.iter().any(|m| m.2);
            let files: Vec<PathBuf> = models
                .into_iter()
                .filter(|m| m.2 || !indexed)
                .flat_map(|m| m.1)
                .collect();
            if !files.is_empty() {
                units.push((Some(name), None, files));
            }
        }
        if units.is_empty() {
            return Err(LoaderError::NoFiles {
                path: path.to_owned(),
            });
        }
        Self::from_units(path, units)
    }

    /// Opens the given files as groups: `(group name, files)`. File indices
    /// follow the order given.
    pub fn from_groups(root: &Path, groups: Vec<(Option<String>, Vec<PathBuf>)>) -> Result<Self> {
        Self::from_units(
            root,
            groups.into_iter().map(|(g, f)| (g, None, f)).collect(),
        )
    }

    fn from_units(root: &Path, units: Vec<Unit>) -> Result<Self> {
        let mut files = Vec::new();
        let mut file_groups = Vec::new();
        let mut file_units = Vec::new();
        let mut index: HashMap<(Option<String>, String), (usize, usize)> = HashMap::new();
        for (group, unit, paths) in units {
            let key_group = group.clone().or_else(|| unit.clone());
            for p in paths {
                let fi = files.len();
                let f = SafetensorsFile::open_indexed(&p, fi)?;
                for (ti, t) in f.tensors().iter().enumerate() {
                    let key = (key_group.clone(), t.name.clone());
                    if let Some(&(other, _)) = index.get(&key) {
                        let other_path: &SafetensorsFile = &files[other];
                        return Err(LoaderError::DuplicateTensor {
                            tensor: t.name.clone(),
                            first: other_path.path().to_owned(),
                            second: p.clone(),
                        });
                    }
                    index.insert(key, (fi, ti));
                }
                files.push(f);
                file_groups.push(group.clone());
                file_units.push(unit.clone());
            }
        }
        if files.is_empty() {
            return Err(LoaderError::NoFiles {
                path: root.to_owned(),
            });
        }
        Ok(Checkpoint {
            root: root.to_owned(),
            files,
            file_groups,
            file_units,
            index,
        })
    }

    /// The path it was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The open files; a tensor's [`TensorInfo::file`] indexes this.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Group (subfolder name, `None` for top-level files) of each file.
    pub fn file_groups(&self) -> &[Option<String>] {
        &self.file_groups
    }

    /// Model of each top-level file when the folder holds several (the
    /// file stem of a lone file, `NAME` of a `NAME-NNNNN-of-NNNNN` shard
    /// set or of a `NAME.safetensors.index.json`); `None` otherwise.
    pub fn file_units(&self) -> &[Option<String>] {
        &self.file_units
    }

    /// Every tensor of every file, file by file, in data-offset order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.files.iter().flat_map(|f| f.tensors())
    }

    /// Number of tensors over all files.
    pub fn tensor_count(&self) -> usize {
        self.files.iter().map(|f| f.tensors().len()).sum()
    }

    /// The tensor `name` in group `group`: a subfolder name, or the model
    /// name of a folder that holds several top-level models (see
    /// [`Checkpoint::file_units`]); `None`: the top-level files of a
    /// single model.
    pub fn get_in(&self, group: Option<&str>, name: &str) -> Option<&TensorInfo> {
        self.index
            .get(&(group.map(str::to_owned), name.to_owned()))
            .map(|&(f, t)| &self.files[f].tensors()[t])
    }

    /// The top-level tensor `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.get_in(None, name)
    }

    fn file_of(&self, t: &TensorInfo) -> Result<&SafetensorsFile> {
        self.files.get(t.file).ok_or(LoaderError::BadFileIndex {
            tensor: t.name.clone(),
            file: t.file,
            files: self.files.len(),
        })
    }

    /// Reads the whole tensor `t` (from this checkpoint's headers) into
    /// `dst`, whose length must equal `t.len`.
    pub fn read_tensor_into(&self, t: &TensorInfo, dst: &mut [u8]) -> Result<()> {
        let f = self.file_of(t)?;
        if dst.len() as u64 != t.len {
            return Err(LoaderError::BufferSize {
                path: f.path().to_owned(),
                tensor: t.name.clone(),
                len: t.len,
                dst_len: dst.len() as u64,
            });
        }
        f.read_info_range_into(t, 0, dst)
    }

    /// Reads `dst.len()` bytes of tensor `t` starting `offset` bytes into
    /// it.
    pub fn read_tensor_range_into(
        &self,
        t: &TensorInfo,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        self.file_of(t)?.read_info_range_into(t, offset, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data_len));
        b
    }

    fn parse(header: &str, data_len: usize) -> Result<Header> {
        parse_file_bytes(Path::new("x.safetensors"), &file_bytes(header, data_len), 0)
    }

    #[test]
    fn valid_header() {
        let h = parse(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2,3],"data_offsets":[4,16]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"U8","shape":[0],"data_offsets":[16,16]}}"#,
            16,
        )
        .unwrap();
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "e"]);
        let hl = h.header_len;
        assert_eq!(h.data_start, 8 + hl);
        assert_eq!(h.tensors[1].data_offset, 8 + hl + 4);
        assert_eq!(h.tensors[1].len, 12);
        assert_eq!(h.tensors[1].numel(), 6);
        assert_eq!(h.tensors[0].numel(), 1);
        assert_eq!(h.tensors[2].len, 0);
    }

    #[test]
    fn each_violation_has_its_error() {
        let e = |hdr: &str, n: usize| parse(hdr, n).unwrap_err();
        assert!(matches!(
            e("[1]", 0),
            LoaderError::HeaderNotObject {
                found: "an array",
                ..
            }
        ));
        assert!(matches!(e("{", 0), LoaderError::HeaderJson { .. }));
        match e(
            r#"{"t":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ) {
            LoaderError::UnknownDtype { tensor, dtype, .. } => {
                assert_eq!((tensor.as_str(), dtype.as_str()), ("t", "F17"))
            }
            other => panic!("{other}"),
        }
        match e(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#,
            8,
        ) {
            LoaderError::OffsetsOutOfRange {
                begin,
                end,
                data_len,
                ..
            } => assert_eq!((begin, end, data_len), (0, 12, 8)),
            other => panic!("{other}"),
        }
        match e(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[8,4]}}"#,
            8,
        ) {
            LoaderError::ReversedOffsets { begin, end, .. } => assert_eq!((begin, end), (8, 4)),
            other => panic!("{other}"),
        }
        match e(
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ) {
            LoaderError::SizeMismatch {
                expected, actual, ..
            } => assert_eq!((expected, actual), (12, 8)),
            other => panic!("{other}"),
        }
        match e(
            r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
        ) {
            LoaderError::ShapeOverflow { shape, .. } => {
                assert_eq!(shape, vec![1u64 << 32, 1u64 << 32])
            }
            other => panic!("{other}"),
        }
        match e(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        ) {
            LoaderError::Overlap {
                first,
                second,
                first_begin,
                first_end,
                second_begin,
                second_end,
                ..
            } => {
                assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
                assert_eq!(
                    (first_begin, first_end, second_begin, second_end),
                    (0, 8, 4, 8)
                );
            }
            other => panic!("{other}"),
        }
        assert!(matches!(
            e(r#"{"__metadata__":{"k":1}}"#, 0),
            LoaderError::BadMetadata { .. }
        ));
        assert!(matches!(
            e(r#"{"__metadata__":[]}"#, 0),
            LoaderError::BadMetadata { .. }
        ));
        for (bad, what) in [
            (
                r#"{"t":{"shape":[1],"data_offsets":[0,1]}}"#,
                "missing field `dtype`",
            ),
            (
                r#"{"t":{"dtype":"U8","data_offsets":[0,1]}}"#,
                "missing field `shape`",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[1]}}"#,
                "missing field `data_offsets`",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                "`shape`[0] is -1",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
                "`data_offsets` has 3 elements",
            ),
            (
                r#"{"t":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}"#,
                "`dtype` is a number",
            ),
            (r#"{"t":7}"#, "entry is a number"),
        ] {
            match e(bad, 4) {
                LoaderError::BadTensorEntry {
                    tensor, problem, ..
                } => {
                    assert_eq!(tensor, "t");
                    assert!(problem.starts_with(what), "{problem} vs {what}");
                }
                other => panic!("{bad}: {other}"),
            }
        }
    }

    #[test]
    fn header_length_checks() {
        let p = Path::new("f.safetensors");
        assert!(matches!(
            parse_file_bytes(p, &[1, 2, 3], 0),
            Err(LoaderError::FileTooShort { file_len: 3, .. })
        ));
        let mut b = file_bytes("{}", 0);
        b[0] = 3; // header length 3 > 2 available bytes
        assert!(matches!(
            parse_file_bytes(p, &b, 0),
            Err(LoaderError::HeaderLenOutOfRange {
                header_len: 3,
                available: 2,
                file_len: 10,
                ..
            })
        ));
        let mut b = file_bytes("{}", 0);
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_file_bytes(p, &b, 0),
            Err(LoaderError::HeaderLenOutOfRange {
                header_len: u64::MAX,
                ..
            })
        ));
        let err = parse_file_bytes(p, &b, 0).unwrap_err().to_string();
        assert!(
            err.starts_with("f.safetensors: header length 18446744073709551615"),
            "{err}"
        );
    }

    #[test]
    fn variants() {
        assert_eq!(variant_of("model.safetensors"), None);
        assert_eq!(variant_of("model-00001-of-00002.safetensors"), None);
        assert_eq!(
            variant_of("diffusion_pytorch_model.fp16.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(
            variant_of("diffusion_pytorch_model.fp16-00001-of-00002.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(
            variant_of("model-00001-of-00002.bf16.safetensors").as_deref(),
            Some("bf16")
        );
        for tag in ["fp32", "fp8", "ema", "non_ema", "non-ema", "noema"] {
            assert_eq!(
                variant_of(&format!("unet.{tag}.safetensors")).as_deref(),
                Some(tag)
            );
        }
        assert_eq!(variant_of("model.bin"), None);
        // A dot in a model's name is no variant.
        assert_eq!(variant_of("sd_xl_base_1.0.safetensors"), None);
        assert_eq!(variant_of("sd_xl_refiner_1.0.safetensors"), None);
        assert_eq!(variant_of("sd_xl_base_1.0_0.9vae.safetensors"), None);
        assert_eq!(variant_of("flux1-dev.safetensors"), None);
    }

    #[test]
    fn shard_names() {
        assert_eq!(
            shard_set_of("model-00001-of-00002.safetensors"),
            Some(("model".into(), 2))
        );
        assert_eq!(
            shard_set_of("diffusion_pytorch_model.fp16-00002-of-00003.safetensors"),
            Some(("diffusion_pytorch_model.fp16".into(), 3))
        );
        assert_eq!(
            shard_set_of("model-00001-of-00002.fp16.safetensors"),
            Some(("model.fp16".into(), 2))
        );
        assert_eq!(shard_set_of("flux1-dev.safetensors"), None);
        assert_eq!(shard_set_of("model-extra.safetensors"), None);
        assert_eq!(shard_set_of("-00001-of-00002.safetensors"), None);
        assert_eq!(shard_set_of("a-1-of-.safetensors"), None);
        assert_eq!(
            index_name("model.safetensors.index.json"),
            Some(("model", None))
        );
        assert_eq!(
            index_name("diffusion_pytorch_model.safetensors.index.fp16.json"),
            Some(("diffusion_pytorch_model", Some("fp16".into())))
        );
        assert_eq!(index_name("model_index.json"), None);
        assert_eq!(index_name("x.safetensors.index.v2.json"), None);
    }

    /// A zero-element tensor may have any other dimensions, but their
    /// product must still fit in 64 bits: code that views a tensor as a
    /// matrix multiplies some of its dimensions.
    #[test]
    fn zero_element_shapes_whose_other_dimensions_overflow() {
        for shape in [
            "[0,1,1099511627776,1099511627776]",
            "[1099511627776,1099511627776,0]",
        ] {
            let h = format!(
                r#"{{"z.lora_down.weight":{{"dtype":"F16","shape":{shape},"data_offsets":[0,0]}}}}"#
            );
            match parse(&h, 0) {
                Err(LoaderError::ShapeOverflow {
                    path,
                    tensor,
                    shape,
                    ..
                }) => {
                    assert_eq!(path, Path::new("x.safetensors"));
                    assert_eq!(tensor, "z.lora_down.weight");
                    assert_eq!(shape.iter().filter(|d| **d == 1 << 40).count(), 2);
                }
                other => panic!("{shape}: {other:?}"),
            }
        }
        // Within 64 bits (times the element size) is fine.
        let h = parse(
            r#"{"z":{"dtype":"F16","shape":[0,4294967296,1073741823],"data_offsets":[0,0]}}"#,
            0,
        )
        .unwrap();
        assert_eq!((h.tensors[0].len, h.tensors[0].numel()), (0, 0));
        // Times 2 bytes it does not fit.
        assert!(matches!(
            parse(
                r#"{"z":{"dtype":"F16","shape":[0,4294967296,4294967295],"data_offsets":[0,0]}}"#,
                0
            ),
            Err(LoaderError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let t = r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        let u = r#"{"dtype":"U8","shape":[1],"data_offsets":[1,2]}"#;
        for (hdr, key, within) in [
            (
                format!(r#"{{"a":{t},"a":{u}}}"#),
                "a",
                "the top-level object",
            ),
            // The same key, escaped differently.
            (
                format!(r#"{{"ab":{t},"a\u0062":{u}}}"#),
                "ab",
                "the top-level object",
            ),
            (
                r#"{"a":{"dtype":"U8","dtype":"F16","shape":[1],"data_offsets":[0,1]}}"#.into(),
                "dtype",
                "tensor `a`",
            ),
            (
                format!(r#"{{"__metadata__":{{"k":"1","k":"2"}},"a":{t}}}"#),
                "k",
                "`__metadata__`",
            ),
        ] {
            match parse(&hdr, 2) {
                Err(LoaderError::DuplicateKey {
                    key: k, within: w, ..
                }) => assert_eq!((k.as_str(), w.as_str()), (key, within), "{hdr}"),
                other => panic!("{hdr}: {other:?}"),
            }
        }
        let msg = parse(&format!(r#"{{"a":{t},"a":{u}}}"#), 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "x.safetensors: header: key `a` appears twice in the top-level object"
        );
        // The same field names in different objects, keys inside strings
        // and arrays: no false alarm.
        let ok = format!(
            r#"{{"__metadata__":{{"a":"\"a\":{{,","b":"[a]"}},"a":{t},"b":{u},"c\"d":{{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}}}"#
        );
        assert_eq!(parse(&ok, 2).unwrap().tensors.len(), 3);
        // Garbage never panics.
        for junk in [&b"\\"[..], b"{\"", b"{\"a\\", b"}}]]", b"{,,\"a\":{\"a\""] {
            let _ = duplicate_key(junk);
        }
    }
}
