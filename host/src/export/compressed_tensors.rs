//! STUB — being implemented.

use std::path::Path;

use gs_quant::Scheme;

use super::{
    DecodedCheckpoint, DecodedLayer, ExportError, ExportOptions, ExportSummary, Exporter,
    NumberRules, QuantLayer,
};
use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::forward::{TensorF32, TensorSource};
use crate::model::{Model, ModelConfig, ModelError};

pub const RULES: NumberRules = NumberRules {
    scale_dtype: super::model_scale_dtype,
    dequant_dtype: |d| Some(super::model_scale_dtype(d)),
};

pub fn check_scheme(_layer: &str, _scheme: &Scheme) -> Result<(), String> {
    Err("not implemented".into())
}

pub struct CompressedTensorsExport<'m> {
    _m: &'m Model,
}

impl<'m> CompressedTensorsExport<'m> {
    pub fn begin(
        model: &'m Model,
        _output: &Path,
        _options: &ExportOptions,
    ) -> Result<Self, ExportError> {
        Ok(Self { _m: model })
    }
}

impl Exporter for CompressedTensorsExport<'_> {
    fn output(&self) -> &Path {
        todo!()
    }
    fn tensor(&mut self, _name: &str, _values: &[f32]) -> Result<(), ExportError> {
        todo!()
    }
    fn layer(&mut self, _layer: &QuantLayer) -> Result<(), ExportError> {
        todo!()
    }
    fn add_file(&mut self, _name: &str, _bytes: &[u8]) -> Result<(), ExportError> {
        todo!()
    }
    fn finish(self: Box<Self>) -> Result<ExportSummary, ExportError> {
        todo!()
    }
}

pub fn detect(_dir: &Path) -> Result<bool, ExportError> {
    Ok(false)
}

pub struct CompressedTensorsCheckpoint {
    config: ModelConfig,
}

impl CompressedTensorsCheckpoint {
    pub fn open(_dir: &Path) -> Result<Self, ExportError> {
        todo!()
    }
}

impl TensorSource for CompressedTensorsCheckpoint {
    fn tensor_f32(&self, _name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        todo!()
    }
    fn dir(&self) -> std::path::PathBuf {
        todo!()
    }
}

impl DecodedCheckpoint for CompressedTensorsCheckpoint {
    fn format(&self) -> ExportFormat {
        ExportFormat::CompressedTensors
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn quantized_layers(&self) -> Vec<String> {
        todo!()
    }
    fn decode_layer(&self, _name: &str) -> Result<DecodedLayer, ExportError> {
        todo!()
    }
    fn input_quant(&self, _layer: &str) -> Result<Option<ActQuant>, ExportError> {
        todo!()
    }
}
