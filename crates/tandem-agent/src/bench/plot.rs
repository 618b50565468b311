//! Score and success against large-call share, one point per method (SVG).

use super::Row;
use crate::error::AgentError;
use plotters::prelude::*;
use std::path::Path;

pub fn plot_frontier(rows: &[Row], title: &str, path: &Path) -> Result<(), AgentError> {
    let err = |m: String| AgentError::Io(path.to_path_buf(), std::io::Error::other(m));
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
        std::fs::create_dir_all(dir).map_err(|e| AgentError::Io(dir.to_path_buf(), e))?;
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    draw(rows, title, &root).map_err(err)
}

fn draw<DB: DrawingBackend>(
    rows: &[Row],
    title: &str,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..1.05f64, 0.0..1.05f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("large-model call share (calls / steps)")
        .y_desc("held-out success (filled) / score (hollow)")
        .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .draw()
        .map_err(e)?;
    let color = |name: &str| {
        if name.starts_with("LONDI-B") {
            RGBColor(148, 103, 189)
        } else if name.starts_with("LONDI") {
            RGBColor(214, 39, 40)
        } else if name.starts_with("random") {
            RGBColor(127, 127, 127)
        } else if name.starts_with("small-conf") {
            RGBColor(44, 160, 44)
        } else {
            RGBColor(31, 119, 180)
        }
    };
    for r in rows {
        let c = color(&r.name);
        let (x, y) = (r.large_share, r.success);
        chart
            .draw_series([
                Circle::new((x, y), 5, c.filled()),
                Circle::new((x, r.score), 5, c.stroke_width(1)),
            ])
            .map_err(e)?;
        chart
            .draw_series([PathElement::new(
                [
                    (x, (y - r.success_sd).max(0.0)),
                    (x, (y + r.success_sd).min(1.05)),
                ],
                c.stroke_width(1),
            )])
            .map_err(e)?;
        chart
            .draw_series([Text::new(
                r.name.clone(),
                (x + 0.008, y + 0.012),
                ("sans-serif", 12).into_font().color(&c),
            )])
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
