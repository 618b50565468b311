//! A run over time: the share of items each tier answered and the accuracy, over a rolling window.

use crate::error::RunError;
use crate::live::RunState;
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

pub fn write_plot(state: &RunState, path: &Path, window: usize) -> Result<(), RunError> {
    let err = |m: String| RunError::Invalid(format!("cannot write {}: {m}", path.display()));
    prepare(path)?;
    let size = (900, 500);
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(
            state,
            window,
            SVGBackend::new(path, size).into_drawing_area(),
        )
        .map_err(err),
        Some("png") => draw(
            state,
            window,
            BitMapBackend::new(path, size).into_drawing_area(),
        )
        .map_err(err),
        _ => Err(err("the plot path must end in .svg or .png".into())),
    }
}

/// Registers the embedded font (once per process) and creates the plot's directory.
pub(crate) fn prepare(path: &Path) -> Result<(), RunError> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An embedded font that failed to parse would cost the labels, not the numbers.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| RunError::Invalid(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    state: &RunState,
    window: usize,
    root: DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let n = state.history.len();
    let w = window.clamp(1, n.max(1));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("tandem run — share per tier and accuracy (rolling {w} items)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0usize..n.max(1), 0.0..1.0f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("items")
        .y_desc("share / accuracy")
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .draw()
        .map_err(e)?;
    let rolling = |f: &dyn Fn(&(u8, i8)) -> Option<f64>| -> Vec<(usize, f64)> {
        (w..=n)
            .step_by((n / 300).max(1))
            .filter_map(|end| {
                let vals: Vec<f64> = state.history[end - w..end].iter().filter_map(f).collect();
                (!vals.is_empty()).then(|| (end, vals.iter().sum::<f64>() / vals.len() as f64))
            })
            .collect()
    };
    for (i, t) in state.tiers.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts = rolling(&|h| Some(if h.0 as usize == i { 1.0 } else { 0.0 }));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(e)?
            .label(format!("share answered by {}", t.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    let acc = rolling(&|h| (h.1 >= 0).then_some(h.1 as f64));
    if !acc.is_empty() {
        chart
            .draw_series(LineSeries::new(acc, BLACK.stroke_width(2)))
            .map_err(e)?
            .label("accuracy (gold)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
