//! The demo's curves as a PNG: held-out loss and accuracy per round.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

/// Font files tried in turn (Debian's fonts-dejavu-core, then common alternatives).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path =
            FONTS.iter().find(|p| Path::new(p).exists()).ok_or_else(|| format!("no TrueType font found (tried {FONTS:?}); install fonts-dejavu-core"))?;
        let bytes: &'static [u8] = Box::leak(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// `points[r]` = (held-out loss, held-out metric (a fraction: accuracy or exact match), unused) after round r (0 = the initial model).
pub fn curves(path: &Path, points: &[(f64, f64, f64)], metric: &str) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(450);
    let rounds = points.len().saturating_sub(1).max(1) as f64;
    let loss: Vec<(f64, f64)> = points.iter().enumerate().map(|(r, p)| (r as f64, p.0)).collect();
    let acc: Vec<(f64, f64)> = points.iter().enumerate().map(|(r, p)| (r as f64, 100.0 * p.1)).collect();
    let metric_title = format!("held-out {metric} (%)");
    for (area, title, series, color) in [(&left, "held-out loss", &loss, RED), (&right, metric_title.as_str(), &acc, BLUE)] {
        let lo = series.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = series.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.15).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..rounds, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("round").x_labels(points.len().max(2)).x_label_formatter(&|x| format!("{x:.0}")).draw().map_err(|e| anyhow!("{e}"))?;
        chart.draw_series(LineSeries::new(series.iter().copied(), color.stroke_width(3))).map_err(|e| anyhow!("{e}"))?;
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 5, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
