//! Safetensors checkpoints: memory-mapped reading (single files and shards) and atomic writing.

use crate::error::{Error, Result};
use gristmill_core::DType;
use gristmill_core::bnb::RawTensor;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// safetensors' name for a dtype. NF4 has none: bitsandbytes stores packed codes as U8.
pub fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::U8 | DType::NF4 => safetensors::Dtype::U8,
    }
}

struct WriteView<'a>(&'a RawTensor<'a>);

impl safetensors::View for WriteView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// Writes `tensors` to `path` as one safetensors file, atomically: the bytes go to a temporary
/// file beside it, which is renamed over `path` only once complete, so an interrupted write never
/// leaves a damaged checkpoint behind.
pub fn write_safetensors(
    path: &Path,
    tensors: &[RawTensor<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    for t in tensors {
        let expected = t.dtype.storage_bytes(t.shape.iter().product())?;
        if t.data.len() != expected {
            return Err(Error::tensor(
                &t.name,
                format!("{} bytes for shape {:?} of {}: expected {expected}", t.data.len(), t.shape, t.dtype),
            ));
        }
    }
    let tmp = tmp_path(path);
    let views = tensors.iter().map(|t| (t.name.as_str(), WriteView(t)));
    safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| Error::format(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// `dir/.name.tmp` beside `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}
