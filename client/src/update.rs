//! Reading an update from safetensors and writing the aggregate back.
//!
//! An update is either a delta (one file) or an adapter plus the global adapter it was
//! trained from (delta = local − global, tensor by tensor). When the round publishes a
//! tensor layout, the file must hold exactly those tensors with exactly those shapes;
//! otherwise tensors are taken in name order and only the total length must match.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use tessera_secagg::config::TensorSpec;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path} is not a valid safetensors file: {why}")]
    Format { path: String, why: String },
    #[error("tensor {name} in {path} has dtype {dtype}; supported are F32, F16, BF16, F64")]
    Dtype { path: String, name: String, dtype: String },
    #[error("the round expects tensor {name} with shape {expected:?}, {path} has {found}")]
    Shape { path: String, name: String, expected: Vec<u64>, found: String },
    #[error("{path} holds tensors the round does not aggregate: {names:?}")]
    Extra { path: String, names: Vec<String> },
    #[error("the update has {got} values, the round aggregates {expected}")]
    Length { expected: u64, got: u64 },
    #[error("the update and the global adapter differ: {0}")]
    Mismatch(String),
    #[error("the update contains a non-finite value in tensor {0}")]
    NonFinite(String),
    #[error("cannot write {path}: {why}")]
    Write { path: String, why: String },
}

type Tensors = BTreeMap<String, (Vec<u64>, Vec<f32>)>;

fn to_f32(path: &str, name: &str, t: &TensorView<'_>) -> Result<Vec<f32>, UpdateError> {
    let data = t.data();
    let v = match t.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        other => return Err(UpdateError::Dtype { path: path.into(), name: name.into(), dtype: format!("{other:?}") }),
    };
    Ok(v)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

pub fn read_tensors(path: &Path) -> Result<Tensors, UpdateError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| UpdateError::Read { path: p.clone(), why: e.to_string() })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| UpdateError::Format { path: p.clone(), why: e.to_string() })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        let values = to_f32(&p, &name, &view)?;
        if out.insert(peft_name(&name), (shape, values)).is_some() {
            return Err(UpdateError::Format { path: p.clone(), why: format!("tensor {name} appears twice (with and without PEFT's prefix)") });
        }
    }
    Ok(out)
}

/// The module-path name of a tensor saved by PEFT: without `base_model.model.` and the
/// adapter name (`lora_A.default.weight`). Other names are unchanged.
pub fn peft_name(name: &str) -> String {
    tessera_secagg::config::peft_module_name(name)
}

/// Flattens the update for a round: `local` (minus `global` if given), in layout order.
pub fn load_update(local: &Path, global: Option<&Path>, layout: &[TensorSpec], vector_len: u64) -> Result<Vec<f32>, UpdateError> {
    let p = local.display().to_string();
    let mut tensors = read_tensors(local)?;
    if let Some(g) = global {
        let base = read_tensors(g)?;
        if base.keys().ne(tensors.keys()) {
            return Err(UpdateError::Mismatch(format!("tensor names differ between {} and {}", p, g.display())));
        }
        for (name, (shape, values)) in tensors.iter_mut() {
            let (bshape, bvalues) = &base[name];
            if bshape != shape {
                return Err(UpdateError::Mismatch(format!("tensor {name} has shape {shape:?} locally and {bshape:?} globally")));
            }
            values.iter_mut().zip(bvalues).for_each(|(v, b)| *v -= b);
        }
    }
    let mut flat = Vec::with_capacity(vector_len as usize);
    if layout.is_empty() {
        for (_, (_, values)) in tensors {
            flat.extend(values);
        }
    } else {
        for spec in layout {
            // Matched as the file's names are: a layout written with PEFT's own names
            // (`base_model.model.…`) finds the same tensors.
            let (shape, values) = tensors.remove(&spec.module_name()).ok_or_else(|| UpdateError::Shape {
                path: p.clone(),
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: "no such tensor".into(),
            })?;
            if shape != spec.shape {
                return Err(UpdateError::Shape { path: p.clone(), name: spec.name.clone(), expected: spec.shape.clone(), found: format!("shape {shape:?}") });
            }
            flat.extend(values);
        }
        // With the global adapter given, tensors the round does not aggregate may remain
        // when they did not change (FFA-LoRA's frozen A factors); anything else is refused.
        tensors.retain(|_, (_, values)| global.is_none() || values.iter().any(|&v| v != 0.0));
        if !tensors.is_empty() {
            return Err(UpdateError::Extra { path: p, names: tensors.into_keys().collect() });
        }
    }
    if flat.len() as u64 != vector_len {
        return Err(UpdateError::Length { expected: vector_len, got: flat.len() as u64 });
    }
    if let Some(i) = flat.iter().position(|x| !x.is_finite()) {
        return Err(UpdateError::NonFinite(format!("at flat index {i}")));
    }
    Ok(flat)
}

/// Writes a flat vector as safetensors in the round's layout (or one tensor `update`).
pub fn save_flat(path: &Path, flat: &[f32], layout: &[TensorSpec]) -> Result<(), UpdateError> {
    let p = path.display().to_string();
    let specs: Vec<TensorSpec> = if layout.is_empty() { vec![TensorSpec { name: "update".into(), shape: vec![flat.len() as u64] }] } else { layout.to_vec() };
    let mut buffers = Vec::with_capacity(specs.len());
    let mut offset = 0usize;
    for s in &specs {
        let n = s.numel() as usize;
        let chunk = flat.get(offset..offset + n).ok_or_else(|| UpdateError::Length { expected: offset as u64 + n as u64, got: flat.len() as u64 })?;
        buffers.push((
            s.name.clone(),
            s.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
            chunk.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        ));
        offset += n;
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, data)| TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (name.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| UpdateError::Write { path: p.clone(), why: e.to_string() })?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| UpdateError::Write { path: p.clone(), why: e.to_string() })?;
    std::fs::write(path, bytes).map_err(|e| UpdateError::Write { path: p, why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<TensorSpec> {
        vec![TensorSpec { name: "a.lora_A".into(), shape: vec![2, 3] }, TensorSpec { name: "a.lora_B".into(), shape: vec![3, 2] }]
    }

    #[test]
    fn round_trip_delta_and_layout_errors() {
        let dir = tempfile::tempdir().unwrap();
        let local: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let global: Vec<f32> = vec![1.0; 12];
        save_flat(&dir.path().join("local.safetensors"), &local, &layout()).unwrap();
        save_flat(&dir.path().join("global.safetensors"), &global, &layout()).unwrap();
        let delta = load_update(&dir.path().join("local.safetensors"), Some(&dir.path().join("global.safetensors")), &layout(), 12).unwrap();
        assert_eq!(delta, (0..12).map(|i| i as f32 - 1.0).collect::<Vec<_>>());

        let wrong = vec![TensorSpec { name: "a.lora_A".into(), shape: vec![3, 2] }, layout()[1].clone()];
        let err = load_update(&dir.path().join("local.safetensors"), None, &wrong, 12).unwrap_err();
        assert!(matches!(err, UpdateError::Shape { .. }), "{err}");
        let err = load_update(&dir.path().join("local.safetensors"), None, &layout()[..1], 6).unwrap_err();
        assert!(matches!(err, UpdateError::Extra { .. }), "{err}");
        let err = load_update(&dir.path().join("local.safetensors"), None, &[], 13).unwrap_err();
        assert!(matches!(err, UpdateError::Length { expected: 13, got: 12 }), "{err}");
        std::fs::write(dir.path().join("bad.safetensors"), b"\x05\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        assert!(matches!(load_update(&dir.path().join("bad.safetensors"), None, &[], 1), Err(UpdateError::Format { .. })));
    }

    /// A layout in PEFT's own names (as `adapter_model.safetensors` holds them) matches a
    /// file in either spelling, in the layout's order.
    #[test]
    fn a_layout_in_peft_names_matches() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let peft: Vec<TensorSpec> = layout().iter().map(|t| TensorSpec { name: format!("base_model.model.{}.default.weight", t.name), ..t.clone() }).collect();
        let plain: Vec<TensorSpec> = layout().iter().map(|t| TensorSpec { name: format!("{}.weight", t.name), ..t.clone() }).collect();
        for (written, read) in [(&peft, &plain), (&plain, &peft), (&peft, &peft)] {
            save_flat(&dir.path().join("u.safetensors"), &values, written).unwrap();
            assert_eq!(load_update(&dir.path().join("u.safetensors"), None, read, 12).unwrap(), values);
        }
    }

    #[test]
    fn half_precision_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
