//! TEMPORARY stand-in (replaced by the real module at merge).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerEntry {
    pub name: String,
    pub block: usize,
    pub role: String,
    pub scheme: String,
    pub rel_output_error: Option<f64>,
    pub metrics: Vec<(String, String, f64)>,
}
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PerplexityEntry {
    pub point: String,
    pub ppl: f64,
    pub nll_sum: f64,
    pub tokens: u64,
    pub dataset: String,
    pub seqlen: usize,
    pub windows: usize,
}
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub model: String,
    pub format: String,
    pub scheme_summary: String,
    pub layers: Vec<LayerEntry>,
    pub perplexity: Vec<PerplexityEntry>,
}
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Json(String),
}
impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
    pub fn from_json(text: &str) -> Result<Report, ReportError> {
        serde_json::from_str(text).map_err(|e| ReportError::Json(e.to_string()))
    }
    pub fn render_svg(&self) -> Result<String, ReportError> {
        Ok("<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>".into())
    }
}
