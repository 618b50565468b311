//! Quality against strong-call share: every curve of the report, with the weak, strong, random and
//! oracle references, as SVG (and PNG).

use crate::error::EvalError;
use crate::report::EvalReport;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Writes the plot to `path`; the backend follows the extension (`.svg` or `.png`).
pub fn write_plot(report: &EvalReport, path: &Path) -> Result<(), EvalError> {
    let err = |e: String| EvalError::Write {
        path: path.to_path_buf(),
        message: e,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    register_fonts();
    let size = (900, 600);
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(report, SVGBackend::new(path, size).into_drawing_area()).map_err(err),
        Some("png") => {
            draw(report, BitMapBackend::new(path, size).into_drawing_area()).map_err(err)
        }
        _ => Err(err("the plot path must end in .svg or .png".into())),
    }
}

/// Registers the embedded DejaVu Sans under the family name the chart asks for (once per process).
fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An embedded, known-good font cannot fail to parse; if it did, text would be missing
        // from the plot, not the numbers from the report.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn draw<DB: DrawingBackend>(report: &EvalReport, root: DrawingArea<DB, Shift>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let qualities = report
        .policies
        .iter()
        .flat_map(|p| p.curve.iter().map(|c| c.quality).chain([p.quality]))
        .chain([report.q_weak, report.q_strong]);
    let (lo, hi) = qualities.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), q| {
        (lo.min(q), hi.max(q))
    });
    let pad = ((hi - lo) * 0.08).max(0.005);
    let title = format!("{} — quality vs strong-call share", file_name(&report.data));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.0f64, (lo - pad)..(hi + pad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(format!("share of queries sent to {}", report.strong))
        .y_desc("quality (share correct)")
        .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
        .y_label_formatter(&|y| format!("{:.1}%", y * 100.0))
        .draw()
        .map_err(e)?;

    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            [(0.0, report.q_weak), (1.0, report.q_weak)],
            grey.stroke_width(1),
        ))
        .map_err(e)?
        .label(format!("weak only ({})", report.weak))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], grey));
    chart
        .draw_series(LineSeries::new(
            [(0.0, report.q_strong), (1.0, report.q_strong)],
            BLACK.stroke_width(1),
        ))
        .map_err(e)?
        .label(format!("strong only ({})", report.strong))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));

    for (i, p) in report
        .policies
        .iter()
        .filter(|p| !p.curve.is_empty())
        .enumerate()
    {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = p.curve.iter().map(|c| (c.share, c.quality)).collect();
        let label = if p.feedback == "none" {
            p.name.clone()
        } else {
            format!("{} ({})", p.name, p.feedback)
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|xy| Circle::new(xy, 2, color.filled())))
            .map_err(e)?;
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

fn file_name(p: &str) -> &str {
    Path::new(p)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(p)
}
