//! The run report: `report.json` (every quantized linear layer's relative output error and
//! scheme, the perplexity at each evaluation point) and `report.svg` (a chart of the same).
//!
//! Non-finite figures (a layer whose quantized output overflowed, a perplexity that did) are
//! findings, not noise: the JSON keeps them as the strings `"NaN"`, `"inf"` and `"-inf"` (JSON
//! has no such numbers, and `serde_json` would otherwise write `null`), and the chart leaves
//! such layers out with a note naming them.

use std::fmt;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

/// The report's file names inside the output directory.
pub const JSON_FILE: &str = "report.json";
pub const SVG_FILE: &str = "report.svg";

/// One quantized linear layer's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// Full tensor-path name, e.g. `"model.layers.3.mlp.down_proj"`.
    pub name: String,
    pub block: usize,
    /// `"q"`, `"k"`, `"v"`, `"o"`, `"gate"`, `"up"`, `"down"`.
    pub role: String,
    /// Short human form, e.g. `"w4 g128 sym"` or `"w8 ch sym, a8 tensor static asym"`.
    pub scheme: String,
    /// ‖y_q − y‖_F / ‖y‖_F of the layer output on the calibration data (None: no calibration
    /// data).
    #[serde(default, with = "json_float::option")]
    pub rel_output_error: Option<f64>,
    /// Metrics plugins reported: (algorithm, key, value).
    #[serde(default, with = "json_float::triples")]
    pub metrics: Vec<(String, String, f64)>,
}

/// Perplexity at one evaluation point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityEntry {
    /// `"float"`, `"fake_quant"` or `"exported"`.
    pub point: String,
    #[serde(with = "json_float")]
    pub ppl: f64,
    #[serde(with = "json_float")]
    pub nll_sum: f64,
    pub tokens: u64,
    pub dataset: String,
    pub seqlen: usize,
    pub windows: usize,
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub model: String,
    pub format: String,
    pub scheme_summary: String,
    #[serde(default)]
    pub layers: Vec<LayerEntry>,
    #[serde(default)]
    pub perplexity: Vec<PerplexityEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("not a valid report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("drawing the report chart failed: {0}")]
    Plot(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The chart's y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YScale {
    Linear,
    Log,
}

/// Errors spanning more decades than this (max/min over the positive finite ones) are drawn on a
/// log axis.
pub const LOG_SCALE_DECADES: f64 = 1.5;

impl Report {
    /// Pretty JSON in the structs' field order, with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .expect("a Report has string keys and serializes every float");
        text.push('\n');
        text
    }

    pub fn from_json(text: &str) -> Result<Report, ReportError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Writes `report.json` and `report.svg` into `dir` (which must exist).
    pub fn write_files(&self, dir: &Path) -> Result<(), ReportError> {
        let svg = self.render_svg()?;
        for (name, text) in [(JSON_FILE, self.to_json()), (SVG_FILE, svg)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| ReportError::Io { path, source })?;
        }
        Ok(())
    }

    /// The y axis the chart uses: log when the positive finite errors span more than
    /// [`LOG_SCALE_DECADES`], else linear.
    pub fn y_scale(&self) -> YScale {
        let errors: Vec<f64> = self
            .layers
            .iter()
            .filter_map(|l| l.rel_output_error)
            .collect();
        choose_scale(&errors)
    }

    /// The chart as a complete SVG document.
    pub fn render_svg(&self) -> Result<String, ReportError> {
        let plan = Plan::new(self);
        let mut svg = String::new();
        {
            let root =
                SVGBackend::with_string(&mut svg, (plan.width, plan.height)).into_drawing_area();
            draw(&root, &plan)?;
            root.present().map_err(plot_err)?;
        }
        Ok(svg)
    }
}

fn choose_scale(errors: &[f64]) -> YScale {
    let positive = errors.iter().copied().filter(|e| e.is_finite() && *e > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0f64), |(lo, hi), e| {
        (lo.min(e), hi.max(e))
    });
    if hi > 0.0 && (hi / lo).log10() > LOG_SCALE_DECADES {
        YScale::Log
    } else {
        YScale::Linear
    }
}

fn plot_err<E: fmt::Display>(e: E) -> ReportError {
    ReportError::Plot(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Layout

const HEIGHT_PLOT: u32 = 520;
const MIN_WIDTH: f64 = 960.0;
const MAX_WIDTH: f64 = 2400.0;
/// Pixels of the plot's frame (y labels, margins) around the bars.
const FRAME_WIDTH: f64 = 150.0;
/// Empty slots between two blocks' bars.
const BLOCK_GAP: f64 = 0.8;
/// Part of a slot a bar fills; bars a few pixels wide touch (gaps would round to 0–1 px and
/// make their widths uneven).
const BAR_FILL: f64 = 0.78;
const THIN_BAR_PX: f64 = 6.0;
const FONT: &str = "sans-serif";

/// Known roles in model order, with their colours (Tableau 10).
const ROLE_COLOURS: [(&str, RGBColor); 7] = [
    ("q", RGBColor(0x4e, 0x79, 0xa7)),
    ("k", RGBColor(0xf2, 0x8e, 0x2b)),
    ("v", RGBColor(0xe1, 0x57, 0x59)),
    ("o", RGBColor(0x76, 0xb7, 0xb2)),
    ("gate", RGBColor(0x59, 0xa1, 0x4f)),
    ("up", RGBColor(0xd4, 0xa6, 0x1c)),
    ("down", RGBColor(0xb0, 0x7a, 0xa1)),
];
/// Colours for roles outside [`ROLE_COLOURS`], in order of appearance.
const EXTRA_COLOURS: [RGBColor; 4] = [
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x80, 0x80, 0x80),
    RGBColor(0x2f, 0x4b, 0x7c),
];
const TEXT: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x55, 0x55, 0x55);
const WARN: RGBColor = RGBColor(0xb0, 0x1c, 0x1c);

struct Bar {
    x: f64,
    /// In axis units: the error, or its log10 on a log axis.
    y: f64,
    role: usize,
}

struct BlockSpan {
    block: usize,
    x0: f64,
    x1: f64,
}

struct Note {
    text: String,
    warn: bool,
}

struct Plan {
    width: u32,
    height: u32,
    header_height: u32,
    bar_fill: f64,
    bars: Vec<Bar>,
    blocks: Vec<BlockSpan>,
    roles: Vec<(String, RGBColor)>,
    scale: YScale,
    /// Axis range, in axis units.
    x_range: (f64, f64),
    y_range: (f64, f64),
    y_bold: Vec<f64>,
    y_light: Vec<f64>,
    /// Every `label_every`-th block number is written on the x axis.
    label_every: usize,
    header_lines: Vec<(String, RGBColor, u32)>,
    notes: Vec<Note>,
    /// Written across the empty plot when nothing is drawn.
    center_note: Option<String>,
}

impl Plan {
    fn new(report: &Report) -> Plan {
        let mut notes = Vec::new();

        // Which layers are drawn: those with a finite error, grouped by block in model order.
        let mut drawn: Vec<(&LayerEntry, f64)> = Vec::new();
        let mut missing = 0usize;
        let mut non_finite = Vec::new();
        for layer in &report.layers {
            match layer.rel_output_error {
                None => missing += 1,
                Some(e) if !e.is_finite() => non_finite.push((layer.name.as_str(), e)),
                Some(e) => drawn.push((layer, e)),
            }
        }
        drawn.sort_by_key(|(l, _)| l.block); // stable: model order within a block
        let total = report.layers.len();

        if !non_finite.is_empty() {
            let listed: Vec<String> = non_finite
                .iter()
                .take(3)
                .map(|(name, e)| format!("{name} ({})", float_text(*e)))
                .collect();
            let more = non_finite.len().saturating_sub(listed.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            notes.push(Note {
                text: format!(
                    "{} layer{} with a non-finite output error not drawn: {}{more}",
                    non_finite.len(),
                    plural(non_finite.len()),
                    listed.join(", ")
                ),
                warn: true,
            });
        }
        if missing > 0 && missing < total {
            notes.push(Note {
                text: format!(
                    "{missing} of {total} layers have no output error (no calibration data) and are not drawn"
                ),
                warn: false,
            });
        }
        let center_note = if total == 0 {
            Some("no quantized layers".to_string())
        } else if missing == total {
            Some("no calibration data: no output errors".to_string())
        } else if drawn.is_empty() {
            Some("no finite output errors".to_string())
        } else {
            None
        };

        // Roles: known ones in model order, then the others as they appear.
        let mut roles: Vec<(String, RGBColor)> = ROLE_COLOURS
            .iter()
            .filter(|(r, _)| drawn.iter().any(|(l, _)| l.role == *r))
            .map(|(r, c)| (r.to_string(), *c))
            .collect();
        let mut extra = 0usize;
        for (layer, _) in &drawn {
            if !roles.iter().any(|(r, _)| *r == layer.role) {
                roles.push((
                    layer.role.clone(),
                    EXTRA_COLOURS[extra % EXTRA_COLOURS.len()],
                ));
                extra += 1;
            }
        }

        // x: one slot per drawn layer, a gap between blocks.
        let mut blocks: Vec<BlockSpan> = Vec::new();
        let mut xs = Vec::with_capacity(drawn.len());
        let mut x = 0.0;
        for (i, (layer, _)) in drawn.iter().enumerate() {
            if i > 0 {
                x += 1.0;
                if blocks.last().is_some_and(|b| b.block != layer.block) {
                    x += BLOCK_GAP;
                }
            }
            match blocks.last_mut() {
                Some(b) if b.block == layer.block => b.x1 = x,
                _ => blocks.push(BlockSpan {
                    block: layer.block,
                    x0: x,
                    x1: x,
                }),
            }
            xs.push(x);
        }
        let pad = 0.5 + BLOCK_GAP / 2.0;
        let x_range = (-pad, x + pad);
        let slots = x_range.1 - x_range.0;

        // Width scales with the number of bars: wide bars for a small model, thin ones (capped
        // width) for a deep one.
        let px_per_slot = (1400.0 / slots).clamp(3.0, 28.0);
        let width = (slots * px_per_slot + FRAME_WIDTH).clamp(MIN_WIDTH, MAX_WIDTH);
        let plot_px = width - FRAME_WIDTH;
        let block_px = if blocks.is_empty() {
            plot_px
        } else {
            plot_px * (slots / blocks.len() as f64) / slots
        };
        let widest = blocks
            .iter()
            .map(|b| b.block.to_string().len())
            .max()
            .unwrap_or(1) as f64;
        let label_px = widest * 9.0 + 14.0;
        let label_every = [1usize, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
            .into_iter()
            .find(|k| block_px * *k as f64 >= label_px)
            .unwrap_or(1000);

        // y.
        let errors: Vec<f64> = drawn.iter().map(|(_, e)| *e).collect();
        let scale = choose_scale(&errors);
        let (y_range, y_bold, y_light) = match scale {
            YScale::Linear => linear_axis(errors.iter().copied().fold(0.0, f64::max)),
            YScale::Log => {
                let positive = errors.iter().copied().filter(|e| *e > 0.0);
                let lo = positive.clone().fold(f64::INFINITY, f64::min);
                let hi = positive.fold(0.0, f64::max);
                log_axis(lo, hi)
            }
        };
        let bars = drawn
            .iter()
            .zip(&xs)
            .map(|((layer, e), x)| Bar {
                x: *x,
                y: match scale {
                    YScale::Linear => *e,
                    YScale::Log if *e > 0.0 => e.log10(),
                    YScale::Log => y_range.0,
                },
                role: roles
                    .iter()
                    .position(|(r, _)| *r == layer.role)
                    .unwrap_or(0),
            })
            .collect();
        if scale == YScale::Log {
            let zeros = errors.iter().filter(|e| **e == 0.0).count();
            if zeros > 0 {
                notes.push(Note {
                    text: format!(
                        "{zeros} layer{} with a zero output error (not visible on the log axis)",
                        plural(zeros)
                    ),
                    warn: false,
                });
            }
        }

        // Header: title, subtitle, perplexity; then notes, then the legend row.
        let mut header_lines = vec![(title(report), TEXT, 24)];
        header_lines.push((
            format!(
                "format {} · scheme {}",
                or_dash(&report.format),
                or_dash(&report.scheme_summary)
            ),
            MUTED,
            17,
        ));
        if let Some(line) = perplexity_line(&report.perplexity) {
            header_lines.push((line, TEXT, 17));
        }
        let lines_px: u32 = header_lines.iter().map(|(_, _, s)| line_height(*s)).sum();
        let notes_px = notes.len() as u32 * line_height(15);
        let legend_px = if roles.is_empty() { 0 } else { 30 };
        let header_height = 14 + lines_px + notes_px + legend_px + 6;

        Plan {
            width: width.round() as u32,
            height: header_height + HEIGHT_PLOT,
            header_height,
            bar_fill: if px_per_slot < THIN_BAR_PX {
                1.0
            } else {
                BAR_FILL
            },
            bars,
            blocks,
            roles,
            scale,
            x_range,
            y_range,
            y_bold,
            y_light,
            label_every,
            header_lines,
            notes,
            center_note,
        }
    }

    /// Tick positions on x: the centres of the labelled blocks.
    fn x_ticks(&self) -> Vec<f64> {
        self.blocks
            .iter()
            .filter(|b| b.block % self.label_every == 0 || self.blocks.len() == 1)
            .map(|b| (b.x0 + b.x1) / 2.0)
            .collect()
    }

    /// The block number written under a tick.
    fn x_label(&self, x: f64) -> String {
        self.blocks
            .iter()
            .min_by(|a, b| {
                let da = ((a.x0 + a.x1) / 2.0 - x).abs();
                let db = ((b.x0 + b.x1) / 2.0 - x).abs();
                da.total_cmp(&db)
            })
            .map(|b| b.block.to_string())
            .unwrap_or_default()
    }

    fn y_label(&self, y: f64) -> String {
        match self.scale {
            YScale::Linear => {
                let step = self
                    .y_bold
                    .windows(2)
                    .map(|w| w[1] - w[0])
                    .next()
                    .unwrap_or(1.0);
                let decimals = (-step.log10().floor()).max(0.0) as usize;
                format!("{y:.decimals$}")
            }
            YScale::Log => log_label(10f64.powf(y)),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "–"
    } else {
        s
    }
}

fn line_height(font: u32) -> u32 {
    font * 13 / 10 + 2
}

fn title(report: &Report) -> String {
    format!(
        "{}: relative output error per quantized layer",
        or_dash(&report.model)
    )
}

fn float_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:.2}")
    }
}

/// "perplexity (wikitext2, seqlen 2048, 40 windows): float 28.68 · fake_quant 40.69 · …";
/// entries measured on other data than the first say so each.
fn perplexity_line(entries: &[PerplexityEntry]) -> Option<String> {
    let first = entries.first()?;
    let same = entries.iter().all(|e| {
        (&e.dataset, e.seqlen, e.windows) == (&first.dataset, first.seqlen, first.windows)
    });
    let figures: Vec<String> = entries
        .iter()
        .map(|e| {
            if same {
                format!("{} {}", e.point, float_text(e.ppl))
            } else {
                format!(
                    "{} {} ({}, seqlen {})",
                    e.point,
                    float_text(e.ppl),
                    e.dataset,
                    e.seqlen
                )
            }
        })
        .collect();
    let context = if same {
        format!(
            " ({}, seqlen {}, {} window{})",
            first.dataset,
            first.seqlen,
            first.windows,
            plural(first.windows)
        )
    } else {
        String::new()
    };
    Some(format!("perplexity{context}: {}", figures.join(" · ")))
}

/// 0 up to a little above `max`, ticks on a 1/2/5 step.
fn linear_axis(max: f64) -> ((f64, f64), Vec<f64>, Vec<f64>) {
    let top = if max > 0.0 { max * 1.08 } else { 1.0 };
    let rough = top / 7.0;
    let mag = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * mag);
    let ticks = |step: f64| -> Vec<f64> {
        (0..)
            .map(|i| i as f64 * step)
            .take_while(|t| *t <= top + step * 1e-9)
            .collect()
    };
    ((0.0, top), ticks(step), ticks(step / 2.0))
}

/// log10 axis from the decade below `lo` (or a little below `lo` when it sits on a decade, so
/// its bar shows) to a little above `hi`: decades labelled (with 2× and 5× as well when there
/// are few), the other integer multiples as light lines.
fn log_axis(lo: f64, hi: f64) -> ((f64, f64), Vec<f64>, Vec<f64>) {
    let lo = lo.log10();
    let mut bottom = lo.floor();
    if lo - bottom < 0.15 {
        bottom = lo - 0.15;
    }
    let top = hi.log10() + 0.12;
    let decades = (top - bottom).ceil() as i32;
    let every = (decades as f64 / 8.0).ceil().max(1.0) as i32;
    let first = bottom.floor() as i32;
    let mut bold = Vec::new();
    let mut light = Vec::new();
    for d in first..=top.floor() as i32 {
        for m in 1..10 {
            let y = d as f64 + (m as f64).log10();
            if y > top {
                break;
            }
            if y < bottom {
                continue;
            }
            let labelled = if m == 1 {
                (d - first) % every == 0
            } else {
                decades <= 3 && (m == 2 || m == 5)
            };
            if labelled {
                bold.push(y);
            } else if decades <= 8 {
                light.push(y);
            }
        }
    }
    ((bottom, top), bold, light)
}

/// 1e-4, 0.002, 0.05, 1, 20, 3e+3: plain decimals near 1, exponents far from it.
fn log_label(v: f64) -> String {
    let exp = v.log10().floor() as i32;
    if (-3..=3).contains(&exp) {
        let decimals = (-exp).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        let mantissa = (v / 10f64.powi(exp)).round();
        if mantissa == 1.0 {
            format!("1e{exp}")
        } else {
            format!("{mantissa}e{exp}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing

fn font(size: u32, colour: RGBColor) -> TextStyle<'static> {
    FontDesc::new(FontFamily::Name(FONT), size as f64, FontStyle::Normal).color(&colour)
}

fn bold_font(size: u32, colour: RGBColor) -> TextStyle<'static> {
    FontDesc::new(FontFamily::Name(FONT), size as f64, FontStyle::Bold).color(&colour)
}

/// Width of `text` at `size` as the SVG viewer will roughly lay it out.
fn text_px(text: &str, size: u32) -> i32 {
    (text.chars().count() as f64 * size as f64 * 0.5).round() as i32
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, plan: &Plan) -> Result<(), ReportError> {
    root.fill(&WHITE).map_err(plot_err)?;
    let (header, body) = root.split_vertically(plan.header_height);

    // Header lines.
    let left = 24;
    let mut y = 14i32;
    for (i, (text, colour, size)) in plan.header_lines.iter().enumerate() {
        let style = if i == 0 {
            bold_font(*size, *colour)
        } else {
            font(*size, *colour)
        };
        header
            .draw(&Text::new(text.clone(), (left, y), style))
            .map_err(plot_err)?;
        y += line_height(*size) as i32;
    }
    for note in &plan.notes {
        let colour = if note.warn { WARN } else { MUTED };
        header
            .draw(&Text::new(note.text.clone(), (left, y), font(15, colour)))
            .map_err(plot_err)?;
        y += line_height(15) as i32;
    }

    // Legend: a swatch and the role name for every role drawn.
    if !plan.roles.is_empty() {
        let y = y + 6;
        let mut x = left;
        header
            .draw(&Text::new(
                "role:",
                (x, y + 8),
                font(16, MUTED).pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(plot_err)?;
        x += text_px("role:", 16) + 14;
        for (role, colour) in &plan.roles {
            header
                .draw(&Rectangle::new(
                    [(x, y + 1), (x + 14, y + 15)],
                    colour.filled(),
                ))
                .map_err(plot_err)?;
            x += 20;
            header
                .draw(&Text::new(
                    role.clone(),
                    (x, y + 8),
                    font(16, TEXT).pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(plot_err)?;
            x += text_px(role, 16) + 22;
        }
    }

    draw_plot(&body, plan)
}

/// A linear axis over f64 with the tick positions given (plotters' own key-point wrapper has no
/// default formatter for f64, so `configure_mesh` would refuse it).
struct Axis {
    lo: f64,
    hi: f64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn draw_plot<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plan: &Plan,
) -> Result<(), ReportError> {
    let x_axis = Axis {
        lo: plan.x_range.0,
        hi: plan.x_range.1,
        bold: plan.x_ticks(),
        light: vec![],
    };
    let y_axis = Axis {
        lo: plan.y_range.0,
        hi: plan.y_range.1,
        bold: plan.y_bold.clone(),
        light: plan.y_light.clone(),
    };
    let mut chart = ChartBuilder::on(area)
        .margin_left(16)
        .margin_right(28)
        .margin_top(8)
        .margin_bottom(12)
        .x_label_area_size(58)
        .y_label_area_size(86)
        .build_cartesian_2d(x_axis, y_axis)
        .map_err(plot_err)?;
    let (y0, y1) = plan.y_range;

    // Alternate blocks shaded, so the eye finds a block's layers.
    chart
        .draw_series(
            plan.blocks
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, b)| {
                    let half = (1.0 + BLOCK_GAP) / 2.0;
                    Rectangle::new(
                        [(b.x0 - half, y0), (b.x1 + half, y1)],
                        RGBColor(0xee, 0xf0, 0xf3).filled(),
                    )
                }),
        )
        .map_err(plot_err)?;

    let x_desc = if plan.label_every > 1 {
        format!("block (labelled every {} blocks)", plan.label_every)
    } else {
        "block".to_string()
    };
    let y_desc = match plan.scale {
        YScale::Linear => "relative output error ‖y_q − y‖ / ‖y‖".to_string(),
        YScale::Log => "relative output error ‖y_q − y‖ / ‖y‖ (log scale)".to_string(),
    };
    let x_label = |x: &f64| plan.x_label(*x);
    let y_label = |y: &f64| plan.y_label(*y);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(BLACK.mix(0.14))
        .light_line_style(BLACK.mix(0.05))
        .axis_style(MUTED)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(font(15, TEXT))
        .axis_desc_style(font(16, TEXT))
        .draw()
        .map_err(plot_err)?;

    let half = plan.bar_fill / 2.0;
    chart
        .draw_series(plan.bars.iter().map(|b| {
            Rectangle::new(
                [(b.x - half, y0), (b.x + half, b.y.max(y0))],
                plan.roles[b.role].1.filled(),
            )
        }))
        .map_err(plot_err)?;

    if let Some(note) = &plan.center_note {
        let (w, h) = chart.plotting_area().dim_in_pixel();
        let style = font(20, MUTED).pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .plotting_area()
            .strip_coord_spec()
            .draw(&Text::new(
                note.clone(),
                (w as i32 / 2, h as i32 / 2),
                style,
            ))
            .map_err(plot_err)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JSON floats: finite ones as numbers, the others as "NaN", "inf", "-inf".

mod json_float {
    use serde::de::{self, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::fmt;

    pub struct F(pub f64);

    impl Serialize for F {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let v = self.0;
            if v.is_finite() {
                s.serialize_f64(v)
            } else if v.is_nan() {
                s.serialize_str("NaN")
            } else if v > 0.0 {
                s.serialize_str("inf")
            } else {
                s.serialize_str("-inf")
            }
        }
    }

    impl<'de> Deserialize<'de> for F {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<F, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = F;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a number or one of \"NaN\", \"inf\", \"-inf\"")
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<F, E> {
                    Ok(F(v))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<F, E> {
                    Ok(F(v as f64))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<F, E> {
                    Ok(F(v as f64))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<F, E> {
                    match v {
                        "NaN" | "nan" => Ok(F(f64::NAN)),
                        "inf" | "+inf" | "Infinity" => Ok(F(f64::INFINITY)),
                        "-inf" | "-Infinity" => Ok(F(f64::NEG_INFINITY)),
                        _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        F(*v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(F::deserialize(d)?.0)
    }

    pub mod option {
        use super::F;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            v.map(F).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<F>::deserialize(d)?.map(|f| f.0))
        }
    }

    /// `(algorithm, key, value)` triples, as JSON arrays `["gptq", "loss", 0.01]`.
    pub mod triples {
        use super::F;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            v: &[(String, String, f64)],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|(a, k, x)| (a, k, F(*x))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<(String, String, f64)>, D::Error> {
            Ok(Vec::<(String, String, F)>::deserialize(d)?
                .into_iter()
                .map(|(a, k, x)| (a, k, x.0))
                .collect())
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

    fn module_of(role: &str) -> &'static str {
        match role {
            "q" => "self_attn.q_proj",
            "k" => "self_attn.k_proj",
            "v" => "self_attn.v_proj",
            "o" => "self_attn.o_proj",
            "gate" => "mlp.gate_proj",
            "up" => "mlp.up_proj",
            _ => "mlp.down_proj",
        }
    }

    /// `blocks` × 7 layers; errors from `err(block, role_index)`.
    fn report(blocks: usize, err: impl Fn(usize, usize) -> Option<f64>) -> Report {
        let layers = (0..blocks)
            .flat_map(|b| {
                let err = &err;
                ROLES.iter().enumerate().map(move |(r, role)| LayerEntry {
                    name: format!("model.layers.{b}.{}", module_of(role)),
                    block: b,
                    role: role.to_string(),
                    scheme: "w4 g128 sym".into(),
                    rel_output_error: err(b, r),
                    metrics: vec![("rtn".into(), "clip_ratio".into(), 0.5 + r as f64 * 0.01)],
                })
            })
            .collect();
        Report {
            model: "TinyLlama-1.1B".into(),
            format: "safetensors-fakequant".into(),
            scheme_summary: "w4 g128 sym".into(),
            layers,
            perplexity: ["float", "fake_quant", "exported"]
                .iter()
                .zip([28.68, 40.69, 40.69])
                .map(|(p, ppl)| PerplexityEntry {
                    point: p.to_string(),
                    ppl,
                    nll_sum: ppl.ln() * 40960.0,
                    tokens: 40960,
                    dataset: "wikitext2".into(),
                    seqlen: 2048,
                    windows: 20,
                })
                .collect(),
        }
    }

    /// Errors in a realistic spread: down_proj worst, growing with depth.
    fn realistic(blocks: usize) -> Report {
        report(blocks, |b, r| {
            let base = [0.031, 0.036, 0.052, 0.047, 0.041, 0.039, 0.12][r];
            Some(
                base * (1.0 + 0.6 * b as f64 / blocks as f64)
                    * (1.0 + 0.07 * ((b * 7 + r) % 5) as f64),
            )
        })
    }

    /// Parses the SVG and returns the texts of its `<text>` elements.
    fn svg_texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or("").trim().to_string())
            .collect()
    }

    fn svg_width(svg: &str) -> f64 {
        let doc = roxmltree::Document::parse(svg).unwrap();
        doc.root_element()
            .attribute("width")
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn json_round_trip() {
        let mut r = realistic(3);
        r.layers[1].rel_output_error = None;
        r.layers[2].rel_output_error = Some(f64::INFINITY);
        r.layers[3]
            .metrics
            .push(("gptq".into(), "loss".into(), f64::NAN));
        let text = r.to_json();
        assert!(text.ends_with("}\n"));
        let back = Report::from_json(&text).unwrap();
        // NaN != NaN: compare the non-NaN part exactly, the NaN by kind.
        assert!(back.layers[3].metrics[1].2.is_nan());
        let mut r2 = r.clone();
        r2.layers[3].metrics.pop();
        let mut back2 = back.clone();
        back2.layers[3].metrics.pop();
        assert_eq!(back2, r2);
        assert_eq!(back.layers[2].rel_output_error, Some(f64::INFINITY));
        assert_eq!(back.layers[1].rel_output_error, None);
        // Stable field order and the textual non-finite forms.
        let name = text.find("\"model\"").unwrap();
        let layers = text.find("\"layers\"").unwrap();
        let ppl = text.find("\"perplexity\"").unwrap();
        assert!(name < layers && layers < ppl);
        assert!(text.contains("\"rel_output_error\": \"inf\""));
        assert!(text.contains("\"NaN\""));
        assert_eq!(Report::from_json(&back.to_json()).unwrap().to_json(), text);
    }

    #[test]
    fn json_errors_and_integers() {
        assert!(matches!(
            Report::from_json("{\"model\": 3}"),
            Err(ReportError::Json(_))
        ));
        let text = r#"{"model":"m","format":"f","scheme_summary":"s",
            "layers":[{"name":"a","block":0,"role":"q","scheme":"w4","rel_output_error":1}],
            "perplexity":[]}"#;
        let r = Report::from_json(text).unwrap();
        assert_eq!(r.layers[0].rel_output_error, Some(1.0));
        assert!(r.layers[0].metrics.is_empty());
        let bad = text.replace("\"rel_output_error\":1", "\"rel_output_error\":\"big\"");
        assert!(Report::from_json(&bad).is_err());
    }

    #[test]
    fn svg_has_legend_block_labels_title_and_perplexity() {
        let r = realistic(5);
        let svg = r.render_svg().unwrap();
        let texts = svg_texts(&svg);
        for role in ROLES {
            assert!(texts.iter().any(|t| t == role), "legend lacks {role}");
        }
        for b in 0..5 {
            assert!(texts.iter().any(|t| *t == b.to_string()), "no label {b}");
        }
        assert!(texts.iter().any(|t| t.contains("TinyLlama-1.1B")));
        assert!(texts
            .iter()
            .any(|t| t.contains("w4 g128 sym") && t.contains("safetensors-fakequant")));
        assert!(texts
            .iter()
            .any(|t| t.contains("float 28.68 · fake_quant 40.69 · exported 40.69")));
        assert_eq!(r.y_scale(), YScale::Linear);
        assert!(!texts.iter().any(|t| t.contains("log scale")));
        // One bar per layer (plus the shading of blocks 1 and 3 and the background).
        let colour = "#B07AA1"; // down
        assert_eq!(svg.matches(colour).count(), 5 + 1);
    }

    #[test]
    fn width_scales_and_labels_thin_out_for_deep_models() {
        let small = realistic(5).render_svg().unwrap();
        let deep = realistic(80).render_svg().unwrap();
        let (ws, wd) = (svg_width(&small), svg_width(&deep));
        assert!(ws < wd && wd <= MAX_WIDTH, "{ws} {wd}");
        let texts = svg_texts(&deep);
        assert!(texts.iter().any(|t| t == "78"));
        assert!(
            !texts.iter().any(|t| t == "79"),
            "every block labelled at 80 blocks"
        );
        assert!(texts.iter().any(|t| t == "block (labelled every 2 blocks)"));
        let empty = Report {
            layers: vec![],
            ..realistic(1)
        };
        assert_eq!(svg_width(&empty.render_svg().unwrap()), MIN_WIDTH);
    }

    #[test]
    fn scale_choice() {
        assert_eq!(choose_scale(&[]), YScale::Linear);
        assert_eq!(choose_scale(&[0.0, 0.0]), YScale::Linear);
        assert_eq!(choose_scale(&[0.01, 0.3]), YScale::Linear); // 1.48 decades
        assert_eq!(choose_scale(&[0.01, 0.4]), YScale::Log); // 1.6 decades
        assert_eq!(choose_scale(&[0.0, 1e-4, 0.01]), YScale::Log);
        assert_eq!(
            choose_scale(&[f64::NAN, 1e-6, f64::INFINITY, 1e-5]),
            YScale::Linear
        );

        let r = report(4, |b, r| Some(10f64.powf(-4.0 + (b * 7 + r) as f64 / 9.0)));
        assert_eq!(r.y_scale(), YScale::Log);
        let texts = svg_texts(&r.render_svg().unwrap());
        assert!(texts.iter().any(|t| t.contains("(log scale)")));
        for decade in ["1e-4", "0.001", "0.01", "0.1", "1"] {
            assert!(texts.iter().any(|t| t == decade), "no tick {decade}");
        }
    }

    #[test]
    fn axis_helpers() {
        let ((lo, hi), bold, light) = linear_axis(0.12);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.12 && !bold.is_empty() && light.len() > bold.len());
        assert!(bold.len() >= 4 && bold.len() <= 10, "{bold:?}");
        let ((lo, hi), bold, _) = log_axis(3e-5, 0.2);
        assert_eq!(lo, -5.0);
        assert!(hi > 0.2f64.log10());
        assert_eq!(bold.len(), 5);
        // A minimum on a decade keeps a visible bar: the axis starts a little below it.
        let ((lo, _), bold, light) = log_axis(1e-4, 0.3);
        assert!(lo < -4.0 && lo > -4.5, "{lo}");
        assert_eq!(bold[0], -4.0);
        assert!(light.iter().all(|y| *y >= lo));
        let ((lo, _), bold, _) = log_axis(1e-12, 1.0);
        assert!(lo < -12.0);
        assert!(bold.len() <= 9, "{bold:?}");
        assert_eq!(log_label(1e-5), "1e-5");
        assert_eq!(log_label(2e-3), "0.002");
        assert_eq!(log_label(5e4), "5e4");
        assert_eq!(log_label(1.0), "1");
    }

    #[test]
    fn empty_layer_list() {
        let r = Report {
            model: "m".into(),
            format: "gguf".into(),
            scheme_summary: "w4".into(),
            layers: vec![],
            perplexity: vec![],
        };
        assert_eq!(Report::from_json(&r.to_json()).unwrap(), r);
        let texts = svg_texts(&r.render_svg().unwrap());
        assert!(texts.iter().any(|t| t == "no quantized layers"));
        assert!(!texts.iter().any(|t| t.starts_with("perplexity")));
    }

    #[test]
    fn no_calibration_data() {
        let r = report(3, |_, _| None);
        let texts = svg_texts(&r.render_svg().unwrap());
        assert!(texts
            .iter()
            .any(|t| t == "no calibration data: no output errors"));
        assert!(!texts.iter().any(|t| t == "gate"), "legend without bars");

        // Some missing: drawn ones stay, a note counts the others.
        let r = report(3, |b, r| (b != 1).then_some(0.01 * (r + 1) as f64));
        let texts = svg_texts(&r.render_svg().unwrap());
        assert!(texts
            .iter()
            .any(|t| t.starts_with("7 of 21 layers have no output error")));
        assert!(texts.iter().any(|t| t == "0") && texts.iter().any(|t| t == "2"));
    }

    /// Non-finite errors are skipped in the chart, with a note naming the layers.
    #[test]
    fn non_finite_errors_are_skipped_with_a_note() {
        let r = report(2, |b, r| match (b, r) {
            (1, 6) => Some(f64::NAN),
            (0, 2) => Some(f64::INFINITY),
            _ => Some(0.02 + 0.001 * r as f64),
        });
        let svg = r.render_svg().unwrap();
        let texts = svg_texts(&svg);
        let note = texts
            .iter()
            .find(|t| t.contains("non-finite"))
            .expect("a note");
        assert!(note.starts_with("2 layers"), "{note}");
        assert!(
            note.contains("model.layers.0.self_attn.v_proj (inf)"),
            "{note}"
        );
        assert!(
            note.contains("model.layers.1.mlp.down_proj (NaN)"),
            "{note}"
        );
        assert!(!svg.contains("NaN\"") && !svg.contains("inf\""));
        assert_eq!(svg.matches("#B07AA1").count(), 1 + 1); // one down bar + legend

        let all_bad = report(1, |_, _| Some(f64::NAN));
        let texts = svg_texts(&all_bad.render_svg().unwrap());
        assert!(texts.iter().any(|t| t == "no finite output errors"));
        assert!(texts.iter().any(|t| t.contains("and 4 more")));
    }

    #[test]
    fn special_characters_and_unknown_roles() {
        let mut r = realistic(2);
        r.model = "a<b & \"c\"".into();
        r.layers[0].role = "qkv_fused".into();
        let texts = svg_texts(&r.render_svg().unwrap());
        assert!(texts.iter().any(|t| t.contains("a<b & \"c\"")));
        assert!(texts.iter().any(|t| t == "qkv_fused"));
    }

    #[test]
    fn write_files_writes_both() {
        let dir = tempfile::tempdir().unwrap();
        let r = realistic(2);
        r.write_files(dir.path()).unwrap();
        let json = std::fs::read_to_string(dir.path().join(JSON_FILE)).unwrap();
        assert_eq!(Report::from_json(&json).unwrap(), r);
        let svg = std::fs::read_to_string(dir.path().join(SVG_FILE)).unwrap();
        svg_texts(&svg);
        let err = r.write_files(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }));
    }

    /// Renders samples to /tmp for a look: `cargo test -p gs-host --lib eval::report -- --ignored`.
    #[test]
    #[ignore]
    fn render_samples() {
        std::fs::write("/tmp/report-sample.svg", realistic(5).render_svg().unwrap()).unwrap();
        std::fs::write(
            "/tmp/report-sample-80.svg",
            realistic(80).render_svg().unwrap(),
        )
        .unwrap();
        let log = report(6, |b, r| match (b, r) {
            (2, 3) => Some(f64::NAN),
            (4, _) => None,
            _ => Some(10f64.powf(-4.0 + (b * 7 + r) as f64 / 12.0)),
        });
        std::fs::write("/tmp/report-sample-log.svg", log.render_svg().unwrap()).unwrap();
        let none = report(5, |_, _| None);
        std::fs::write("/tmp/report-sample-none.svg", none.render_svg().unwrap()).unwrap();
    }
}
