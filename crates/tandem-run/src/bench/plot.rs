//! Accuracy against top-tier share: every policy's frontier on one figure, with the top tier and
//! the best cheap tier as references, and the single-point variants (S4L, L4S) as markers.

use super::summary::DatasetSummary;
use crate::error::RunError;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 6] = [
    RGBColor(140, 140, 140),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// The single-point rows, as triangles in colours of their own.
const MARKERS: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(227, 119, 194),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// Writes the figure; the backend follows the extension (`.svg` or `.png`).
pub fn write_frontiers(s: &DatasetSummary, path: &Path) -> Result<(), RunError> {
    let err = |m: String| RunError::Invalid(format!("cannot write {}: {m}", path.display()));
    crate::plot::prepare(path)?;
    let size = (1000, 650);
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(s, SVGBackend::new(path, size).into_drawing_area()).map_err(err),
        Some("png") => draw(s, BitMapBackend::new(path, size).into_drawing_area()).map_err(err),
        _ => Err(err("the plot path must end in .svg or .png".into())),
    }
}

fn draw<DB: DrawingBackend>(s: &DatasetSummary, root: DrawingArea<DB, Shift>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let lo = s
        .frontiers
        .iter()
        .flat_map(|f| f.points.iter().map(|p| p.accuracy))
        .chain([s.best_cheap_accuracy])
        .fold(f64::INFINITY, f64::min);
    let hi = s
        .frontiers
        .iter()
        .flat_map(|f| f.points.iter().map(|p| p.accuracy))
        .chain([s.top_accuracy])
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.08).max(0.005);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} — accuracy vs top-tier share (mean of {} stream orders)",
                s.name,
                s.seeds.len()
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.0f64, (lo - pad)..(hi + pad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("share of items sent to the top tier")
        .y_desc("accuracy (gold labels)")
        .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
        .y_label_formatter(&|y| format!("{:.1}%", y * 100.0))
        .draw()
        .map_err(e)?;
    for (y, label, color) in [
        (s.top_accuracy, "top tier alone".to_string(), BLACK),
        (
            s.best_cheap_accuracy,
            format!("{} alone (learning from every item)", s.best_cheap_tier),
            RGBColor(120, 120, 120),
        ),
    ] {
        chart
            .draw_series(LineSeries::new([(0.0, y), (1.0, y)], color.stroke_width(1)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
    }
    for (i, f) in s.frontiers.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = f.points.iter().map(|p| (p.top_share, p.accuracy)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(f.family.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|xy| Circle::new(xy, 3, color.filled())))
            .map_err(e)?;
    }
    let singles = s
        .rows
        .iter()
        .filter(|r| !s.frontiers.iter().any(|f| r.name.starts_with(&f.family)));
    for (i, r) in singles.enumerate() {
        let color = MARKERS[i % MARKERS.len()];
        chart
            .draw_series([TriangleMarker::new(
                (r.top_share, r.accuracy),
                7,
                color.filled(),
            )])
            .map_err(e)?
            .label(r.name.clone())
            .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
