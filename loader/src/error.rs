//! The loader's one error type.
//!
//! Every variant that concerns a file names that file; every variant that
//! concerns a tensor names the tensor; every variant caused by a bad number
//! carries that number, so a message alone is enough to find the problem.

use std::io;
use std::path::PathBuf;

use crate::dtype::Dtype;
use crate::lora::LoraProblem;

/// Result alias for the loader.
pub type Result<T, E = LoaderError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, validating, laying out or
/// writing model files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoaderError {
    /// The file or folder could not be opened, listed or inspected.
    #[error("{}: cannot open: {source}", .path.display())]
    Open {
        /// File or folder that could not be opened.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },

    /// An I/O error (other than the file being shorter than expected) while
    /// reading `len` bytes at absolute file offset `offset`.
    #[error("{}: I/O error reading {what} ({len} bytes at offset {offset}): {source}", .path.display())]
    Io {
        /// File being read.
        path: PathBuf,
        /// What was being read (`header`, `tensor `name``, ...).
        what: String,
        /// Absolute offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// Underlying I/O error.
        source: io::Error,
    },

    /// The file is too short to hold the 8-byte header length.
    #[error("{}: file is {file_len} bytes, too short for the 8-byte safetensors header length", .path.display())]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        file_len: u64,
    },

    /// The header length field points past the end of the file.
    #[error("{}: header length {header_len} exceeds the {available} bytes that follow the length field (file is {file_len} bytes)", .path.display())]
    HeaderLenOutOfRange {
        /// The file.
        path: PathBuf,
        /// Header length read from the first 8 bytes.
        header_len: u64,
        /// Bytes available after the length field.
        available: u64,
        /// File length.
        file_len: u64,
    },

    /// The header length field is larger than any sane header.
    #[error("{}: header length {header_len} exceeds the limit of {limit} bytes", .path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// Header length read from the first 8 bytes.
        header_len: u64,
        /// The limit ([`crate::safetensors::MAX_HEADER_LEN`]).
        limit: u64,
    },

    /// The header is not well-formed JSON (or not UTF-8).
    #[error("{}: header ({header_len} bytes) is not valid JSON: {message}", .path.display())]
    HeaderJson {
        /// The file.
        path: PathBuf,
        /// Header length.
        header_len: u64,
        /// Parser message, with line and column.
        message: String,
    },

    /// The header is JSON but not an object.
    #[error("{}: header is JSON {found}, expected an object of tensors", .path.display())]
    HeaderNotObject {
        /// The file.
        path: PathBuf,
        /// Kind of JSON value found instead.
        found: &'static str,
    },

    /// A tensor entry is missing a field or a field has the wrong type or
    /// an impossible value.
    #[error("{}: tensor `{tensor}`: {problem}", .path.display())]
    BadTensorEntry {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong, with the offending value.
        problem: String,
    },

    /// A tensor's dtype is not one of the known dtypes.
    #[error("{}: tensor `{tensor}`: unknown dtype `{dtype}` (known: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2)", .path.display())]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },

    /// `data_offsets` has `begin > end`.
    #[error("{}: tensor `{tensor}`: data_offsets [{begin}, {end}] are reversed", .path.display())]
    ReversedOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Begin offset (relative to the data section).
        begin: u64,
        /// End offset (relative to the data section).
        end: u64,
    },

    /// `data_offsets` reach past the end of the data section.
    #[error("{}: tensor `{tensor}`: data_offsets [{begin}, {end}] extend past the data section of {data_len} bytes", .path.display())]
    OffsetsOutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Begin offset (relative to the data section).
        begin: u64,
        /// End offset (relative to the data section).
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },

    /// Two tensors' byte ranges overlap.
    #[error("{}: tensors `{first}` [{first_begin}, {first_end}) and `{second}` [{second_begin}, {second_end}) overlap", .path.display())]
    Overlap {
        /// The file.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// Its begin offset.
        first_begin: u64,
        /// Its end offset.
        first_end: u64,
        /// The tensor that starts inside the first one.
        second: String,
        /// Its begin offset.
        second_begin: u64,
        /// Its end offset.
        second_end: u64,
    },

    /// The element count times the dtype size overflows 64 bits.
    #[error("{}: tensor `{tensor}`: shape {shape:?} of {dtype} overflows 64-bit byte arithmetic", .path.display())]
    ShapeOverflow {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape.
        shape: Vec<u64>,
        /// The dtype.
        dtype: Dtype,
    },

    /// The shape and dtype need a different number of bytes than the
    /// `data_offsets` range holds.
    #[error("{}: tensor `{tensor}`: shape {shape:?} of {dtype} needs {expected} bytes, data_offsets [{begin}, {end}] hold {actual}", .path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape.
        shape: Vec<u64>,
        /// The dtype.
        dtype: Dtype,
        /// Bytes implied by shape and dtype.
        expected: u64,
        /// Bytes in the range.
        actual: u64,
        /// Begin offset (relative to the data section).
        begin: u64,
        /// End offset (relative to the data section).
        end: u64,
    },

    /// `__metadata__` is not an object of strings.
    #[error("{}: __metadata__: {problem}", .path.display())]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        problem: String,
    },

    /// The same tensor name appears in two files of one shard set.
    #[error("tensor `{tensor}` appears in both {} and {}", .first.display(), .second.display())]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// File where it was first seen.
        first: PathBuf,
        /// File where it was seen again.
        second: PathBuf,
    },

    /// A folder holds no safetensors files to open.
    #[error("{}: no .safetensors files found", .path.display())]
    NoFiles {
        /// The folder.
        path: PathBuf,
    },

    /// A folder holds several variants (`model.fp16.safetensors`,
    /// `model.safetensors`, ...) and none was chosen.
    #[error("{}: several variants of the weights ({variants}); choose one", .path.display())]
    AmbiguousVariant {
        /// The folder.
        path: PathBuf,
        /// The variants found, comma separated (`(none)` is the plain one).
        variants: String,
    },

    /// A tensor was asked for by a name the file does not hold.
    #[error("{}: no tensor named `{tensor}`", .path.display())]
    TensorNotFound {
        /// The file (or folder).
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },

    /// A file index in a tensor reference is out of range.
    #[error("tensor `{tensor}` refers to file index {file}, but only {files} files are open")]
    BadFileIndex {
        /// The tensor.
        tensor: String,
        /// File index found.
        file: usize,
        /// Number of files.
        files: usize,
    },

    /// A read would fall outside the tensor (or data section) it targets.
    #[error("{}: {what}: read of {len} bytes at offset {offset} falls outside [{begin}, {end})", .path.display())]
    ReadOutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor (or `data section`).
        what: String,
        /// Requested offset (absolute in file).
        offset: u64,
        /// Requested length.
        len: u64,
        /// Begin of the allowed range (absolute).
        begin: u64,
        /// End of the allowed range (absolute).
        end: u64,
    },

    /// The destination buffer does not have the tensor's size.
    #[error("{}: tensor `{tensor}` is {len} bytes but the destination buffer is {dst_len} bytes", .path.display())]
    BufferSize {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Tensor byte length.
        len: u64,
        /// Destination length.
        dst_len: u64,
    },

    /// The file became shorter after it was opened (truncated or
    /// rewritten underneath).
    #[error("{}: {what}: file ended early reading {len} bytes at offset {offset}; file is now {file_len_now} bytes, was {file_len_at_open} when opened (truncated after opening?)", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Absolute offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// File length when it was opened.
        file_len_at_open: u64,
        /// File length now (0 if it could not be queried).
        file_len_now: u64,
    },

    /// The file was rewritten after it was opened (its length or
    /// modification time changed): the bytes read may not be the model's.
    #[error("{}: {what}: the file changed after it was opened (now {file_len_now} bytes, was {file_len_at_open}, or rewritten in place)", .path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// File length when it was opened.
        file_len_at_open: u64,
        /// File length now.
        file_len_now: u64,
    },

    /// Bytes could not be decoded as the given dtype.
    #[error("{}cannot decode {len} bytes as {dtype}: {problem}", decode_context(.path.as_deref(), .tensor.as_deref()))]
    Decode {
        /// The file the bytes came from, where known.
        path: Option<PathBuf>,
        /// The tensor the bytes belong to, where known.
        tensor: Option<String>,
        /// The dtype.
        dtype: Dtype,
        /// Byte length offered.
        len: usize,
        /// What is wrong.
        problem: &'static str,
    },

    /// A JSON object of a header names the same key twice (a JSON parser
    /// would silently keep one of them).
    #[error("{}: header: key `{key}` appears twice in {within}", .path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The repeated key.
        key: String,
        /// Which object: `the top-level object`, `tensor `name``,
        /// `__metadata__`.
        within: String,
    },

    /// A `*.safetensors.index.json` weight map is malformed or names a file
    /// that is not there.
    #[error("{}: {problem}", .path.display())]
    ShardIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong, naming the key or file.
        problem: String,
    },

    /// A tensor handed to the writer is inconsistent.
    #[error("{}: cannot write tensor `{tensor}`: {problem}", .path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong, with numbers.
        problem: String,
    },

    /// An I/O error while writing a file.
    #[error("{}: cannot write: {source}", .path.display())]
    WriteIo {
        /// The file being written.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },

    /// A LoRA adapter could not be applied: its key names no tensor of the
    /// model, its factors do not agree with each other or with the target,
    /// or it uses a feature that is not supported. Returned in strict mode
    /// (lenient mode lists it in [`crate::lora::ResolvedLora::skipped`]).
    #[error("{}: LoRA adapter `{key}`: {problem}{}", .path.display(), more_problems(*.more))]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// The adapter's key (the LoRA tensor names without their suffix).
        key: String,
        /// What is wrong, with names and shapes (boxed: keeps the error
        /// small).
        problem: Box<LoraProblem>,
        /// How many other adapters of the file have problems too.
        more: usize,
    },

    /// A LoRA file in a convention that is recognised but cannot be applied
    /// (the cloneofsimo positional format).
    #[error("{}: {convention} LoRA is not supported: {detail}", .path.display())]
    LoraUnsupported {
        /// The LoRA file.
        path: PathBuf,
        /// The convention recognised.
        convention: &'static str,
        /// Why it cannot be applied, with counts.
        detail: String,
    },

    /// A LoRA multiplier that is NaN or infinite.
    #[error("{}: LoRA multiplier {multiplier} is not a finite number", .path.display())]
    LoraMultiplier {
        /// The LoRA file.
        path: PathBuf,
        /// The multiplier given.
        multiplier: f32,
    },

    /// A peft `adapter_config.json` beside a LoRA file is malformed.
    #[error("{}: {problem}", .path.display())]
    LoraConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },

    /// Tensor bytes were asked of a LoRA described by its header alone.
    #[error("{}: tensor `{tensor}`: this LoRA was built from header information only and holds no tensor data", .path.display())]
    LoraNoData {
        /// The LoRA file.
        path: PathBuf,
        /// The tensor asked for.
        tensor: String,
    },
}

fn decode_context(path: Option<&std::path::Path>, tensor: Option<&str>) -> String {
    match (path, tensor) {
        (Some(p), Some(t)) => format!("{}: tensor `{t}`: ", p.display()),
        (Some(p), None) => format!("{}: ", p.display()),
        (None, Some(t)) => format!("tensor `{t}`: "),
        (None, None) => String::new(),
    }
}

impl LoaderError {
    /// Adds the file and tensor to a [`LoaderError::Decode`] that lacks
    /// them; other errors are returned unchanged.
    pub fn in_tensor(self, file: &std::path::Path, name: &str) -> LoaderError {
        match self {
            LoaderError::Decode {
                path,
                tensor,
                dtype,
                len,
                problem,
            } => LoaderError::Decode {
                path: path.or_else(|| Some(file.to_owned())),
                tensor: tensor.or_else(|| Some(name.to_owned())),
                dtype,
                len,
                problem,
            },
            e => e,
        }
    }
}

fn more_problems(more: usize) -> String {
    match more {
        0 => String::new(),
        1 => " (and 1 more adapter with a problem; lenient mode skips and lists them)".into(),
        n => format!(" (and {n} more adapters with problems; lenient mode skips and lists them)"),
    }
}
