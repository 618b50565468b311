//! Quality against strong-call share, and against dollars spent: every curve of the report, with
//! the weak, strong, random and oracle references, as SVG (and PNG).

use crate::error::EvalError;
use crate::report::{CostPoint, EvalReport, LadderReport, PolicyRow};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
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

/// A chart whose axes both hold numbers (shares, dollars, qualities).
type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Writes the plot to `path`; the backend follows the extension (`.svg` or `.png`).
pub fn write_plot(report: &EvalReport, path: &Path) -> Result<(), EvalError> {
    write_chart(
        path,
        (900, 600),
        |area| draw(report, area),
        |area| draw(report, area),
    )
}

/// Writes a chart of `size` pixels to `path` (creating its directory), drawn by `svg` or `png`
/// as the extension says.
fn write_chart(
    path: &Path,
    size: (u32, u32),
    svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<(), EvalError> {
    let err = |e: String| EvalError::Write {
        path: path.to_path_buf(),
        message: e,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    register_fonts();
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(SVGBackend::new(path, size).into_drawing_area()).map_err(err),
        Some("png") => png(BitMapBackend::new(path, size).into_drawing_area()).map_err(err),
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

/// The quality axis: from the lowest quality shown to the highest, padded by 8% of the spread
/// (at least half a point).
fn quality_axis(qualities: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = qualities.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), q| {
        (lo.min(q), hi.max(q))
    });
    let pad = ((hi - lo) * 0.08).max(0.005);
    (lo - pad)..(hi + pad)
}

/// A chart builder on `area` with room for the axes' labels.
fn chart_on<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> ChartBuilder<'_, '_, DB> {
    let mut b = ChartBuilder::on(area);
    b.margin(12).x_label_area_size(45).y_label_area_size(60);
    b
}

/// A policy's curve through `pts`: a line, in the legend by its name (and feedback mode, if it
/// has one), with each point marked.
fn draw_curve<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    pts: Vec<(f64, f64)>,
    color: RGBColor,
    name: &str,
    feedback: &str,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let label = if feedback == "none" {
        name.to_string()
    } else {
        format!("{name} ({feedback})")
    };
    chart
        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
        .map_err(e)?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    chart
        .draw_series(pts.into_iter().map(|xy| Circle::new(xy, 2, color.filled())))
        .map_err(e)?;
    Ok(())
}

/// The legend, lower right on a light box.
fn draw_legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| x.to_string())
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
    let title = format!("{} — quality vs strong-call share", file_name(&report.data));
    let mut chart = chart_on(&root)
        .caption(title, ("sans-serif", 22))
        .build_cartesian_2d(0.0..1.0f64, quality_axis(qualities))
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
        draw_curve(&mut chart, pts, color, &p.name, &p.feedback)?;
    }
    draw_legend(&mut chart)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Writes quality against dollars spent to `path` (`.svg` or `.png`): each policy's curve runs
/// placed by what they spent, each model alone marked at its own spend.
pub fn write_cost_plot(report: &EvalReport, path: &Path) -> Result<(), EvalError> {
    write_chart(
        path,
        (900, 600),
        |area| draw_cost(report, area),
        |area| draw_cost(report, area),
    )
}

/// Where [`write_plot`]'s twin on a dollar axis goes: `NAME-cost.EXT` beside `NAME.EXT`.
/// The SVG and PNG files a plot named `path` is written to: `path` with `.svg` and `.png`,
/// whichever of the two (or none) it ends in, so that naming either gives both.
///
/// Errors: another extension (`p.pdf`), which would otherwise be replaced silently.
pub fn svg_and_png(path: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), EvalError> {
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
    {
        None => {}
        Some(e) if e == "svg" || e == "png" => {}
        Some(e) => {
            return Err(EvalError::Invalid(format!(
            "plot {}: .{e} is not a plot format; name it NAME.svg or NAME.png (both are written)",
            path.display()
        )))
        }
    }
    Ok((path.with_extension("svg"), path.with_extension("png")))
}

pub fn cost_plot_path(share_plot: &Path) -> std::path::PathBuf {
    let stem = share_plot
        .file_stem()
        .map_or_else(|| "plot".into(), |s| s.to_string_lossy().into_owned());
    let ext = share_plot
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    share_plot.with_file_name(format!("{stem}-cost{ext}"))
}

/// A curve's points by spend, cheapest first: the runs are measured in share order, and spend
/// need not rise with share (the escalated prompts differ), so a line through them in that order
/// could double back.
pub fn cost_curve(points: &[CostPoint]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = points.iter().map(|c| (c.cost_usd, c.quality)).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    pts
}

fn row_label(p: &PolicyRow) -> String {
    if p.feedback == "none" {
        p.name.clone()
    } else {
        format!("{} ({})", p.name, p.feedback)
    }
}

fn draw_cost<DB: DrawingBackend>(
    report: &EvalReport,
    root: DrawingArea<DB, Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let qualities = report
        .policies
        .iter()
        .flat_map(|p| p.curve_cost.iter().map(|c| c.quality).chain([p.quality]))
        .chain([report.q_weak, report.q_strong]);
    let alone = [
        (report.cost_weak_usd, report.q_weak, &report.weak),
        (report.cost_strong_usd, report.q_strong, &report.strong),
    ];
    let max_cost = report
        .policies
        .iter()
        .flat_map(|p| p.curve_cost.iter().map(|c| c.cost_usd).chain([p.cost_usd]))
        .chain(alone.iter().filter_map(|a| a.0))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.05;
    let title = format!("{} — quality vs dollars spent", file_name(&report.data));
    let mut chart = chart_on(&root)
        .caption(title, ("sans-serif", 22))
        .build_cartesian_2d(0.0..max_cost, quality_axis(qualities))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("cost of the run ($)")
        .y_desc("quality (share correct)")
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| format!("{:.1}%", y * 100.0))
        .draw()
        .map_err(e)?;

    // Each model alone: a marker at its spend, labelled with it; the strong model's label sits
    // to the marker's left, inside the chart.
    for (i, (cost, quality, name)) in alone.into_iter().enumerate() {
        let Some(cost) = cost else { continue };
        chart
            .draw_series([EmptyElement::at((cost, quality))
                + TriangleMarker::new((0, 0), 6, BLACK.filled())
                + Text::new(
                    format!("{} alone (${cost:.2})", name),
                    (if i == 1 { -260 } else { 10 }, -20),
                    ("sans-serif", 13).into_font(),
                )])
            .map_err(e)?;
    }
    for (i, p) in report
        .policies
        .iter()
        .filter(|p| !p.curve_cost.is_empty())
        .enumerate()
    {
        let color = COLORS[i % COLORS.len()];
        draw_curve(
            &mut chart,
            cost_curve(&p.curve_cost),
            color,
            &p.name,
            &p.feedback,
        )?;
    }
    // Policies without a curve (always-weak, always-strong) at their operating point, unless a
    // model-alone marker already labels that point (uncapped, they are the same run).
    let marked = |p: &PolicyRow| {
        alone.iter().any(|(cost, quality, _)| {
            cost.is_some_and(|c| (c - p.cost_usd).abs() <= 1e-9 * c.max(1.0))
                && (quality - p.quality).abs() < 1e-9
        })
    };
    for p in report
        .policies
        .iter()
        .filter(|p| p.curve_cost.is_empty() && !marked(p))
    {
        let label = row_label(p);
        // In the right part of the chart the label goes to the cross's left, inside it
        // (about 7 px a character at this size).
        let dx = if p.cost_usd > 0.6 * max_cost {
            -(7 * label.chars().count() as i32) - 6
        } else {
            6
        };
        chart
            .draw_series([EmptyElement::at((p.cost_usd, p.quality))
                + Cross::new((0, 0), 5, RED.stroke_width(2))
                + Text::new(label, (dx, 4), ("sans-serif", 13).into_font())])
            .map_err(e)?;
    }
    draw_legend(&mut chart)?;
    root.present().map_err(e)?;
    Ok(())
}

fn file_name(p: &str) -> &str {
    Path::new(p)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(p)
}

/// The N-model cascade's frontiers: quality against dollars (left) and against the top tier's
/// share (right), each model alone as a labelled point (the oracle too). `.svg` or `.png`.
pub fn write_ladder_plot(report: &LadderReport, path: &Path) -> Result<(), EvalError> {
    write_chart(
        path,
        (1400, 600),
        |area| draw_ladder(report, area),
        |area| draw_ladder(report, area),
    )
}

fn draw_ladder<DB: DrawingBackend>(
    report: &LadderReport,
    root: DrawingArea<DB, Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(
            &format!(
                "{} — cascade of {} models",
                file_name(&report.data),
                report.models.len()
            ),
            ("sans-serif", 22),
        )
        .map_err(e)?;
    let (left, right) = root.split_horizontally(700);
    let qualities = report
        .policies
        .iter()
        .flat_map(|p| p.frontier.iter().map(|c| c.quality).chain([p.quality]))
        .chain(report.models.iter().map(|m| m.quality));
    let y_axis = quality_axis(qualities);
    let max_cost = report
        .policies
        .iter()
        .flat_map(|p| p.frontier.iter().map(|c| c.cost_usd).chain([p.cost_usd]))
        .chain(report.models.iter().map(|m| m.cost_usd))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.05;
    let top = report.models.last().map_or("top", |m| m.name.as_str());
    // Panel 0: x = dollars; panel 1: x = the top tier's share.
    for (panel, area) in [(0, left), (1, right)] {
        let x_max = if panel == 0 { max_cost } else { 1.0 };
        let mut chart = chart_on(&area)
            .build_cartesian_2d(0.0..x_max, y_axis.clone())
            .map_err(e)?;
        let x_desc = if panel == 0 {
            "cost of the run ($)".to_string()
        } else {
            format!("share of items sent to {top}")
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("quality (share correct)")
            .x_label_formatter(&|x| {
                if panel == 0 {
                    format!("{x:.2}")
                } else {
                    format!("{:.0}%", x * 100.0)
                }
            })
            .y_label_formatter(&|y| format!("{:.1}%", y * 100.0))
            .draw()
            .map_err(e)?;
        let point = |f: &crate::report::FrontierPoint| {
            (if panel == 0 { f.cost_usd } else { f.top_share }, f.quality)
        };
        for (i, p) in report
            .policies
            .iter()
            .filter(|p| !p.frontier.is_empty())
            .enumerate()
        {
            let color = COLORS[i % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = p.frontier.iter().map(point).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            draw_curve(&mut chart, pts, color, &p.name, &p.feedback)?;
        }
        // Each model alone sits at its own cost, and at top share 0 (or 1 for the top model).
        let last = report.models.len().saturating_sub(1);
        for (i, m) in report.models.iter().enumerate() {
            let x = match (panel, i == last) {
                (0, _) => m.cost_usd,
                (_, true) => 1.0,
                _ => 0.0,
            };
            chart
                .draw_series([EmptyElement::at((x, m.quality))
                    + TriangleMarker::new((0, 0), 6, BLACK.filled())
                    + Text::new(
                        format!("{} alone", m.name),
                        // The top model's label to its left, inside the chart.
                        (if i == last { -200 } else { 6 }, -16),
                        ("sans-serif", 13).into_font(),
                    )])
                .map_err(e)?;
        }
        for p in report.policies.iter().filter(|p| p.frontier.is_empty()) {
            let x = if panel == 0 { p.cost_usd } else { p.top_share };
            chart
                .draw_series([EmptyElement::at((x, p.quality))
                    + Cross::new((0, 0), 5, RED.stroke_width(2))
                    + Text::new(p.name.clone(), (6, 4), ("sans-serif", 13).into_font())])
                .map_err(e)?;
        }
        draw_legend(&mut chart)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::metrics::CurvePoint;

    #[test]
    fn either_extension_names_both_plots() {
        for given in ["out/p.png", "out/p.svg", "out/p", "out/p.SVG", "out/p.PNG"] {
            let (svg, png) = svg_and_png(Path::new(given)).unwrap();
            assert_eq!(svg, Path::new("out/p.svg"), "{given}");
            assert_eq!(png, Path::new("out/p.png"), "{given}");
        }
        for bad in ["out/p.pdf", "out/p.jpeg", "out/run.v2"] {
            let e = svg_and_png(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("NAME.svg or NAME.png"), "{e}");
        }
    }

    fn row(name: &str, feedback: &str, curve: &[(f64, f64, f64)]) -> PolicyRow {
        PolicyRow {
            name: name.into(),
            feedback: feedback.into(),
            quality: 0.7,
            strong_share: 0.3,
            explore_share: 0.0,
            cost_usd: curve.get(6).map_or(0.04, |c| c.1),
            capped: 0,
            apgr: None,
            apgr_cost: None,
            cpt50: None,
            cpt80: None,
            decision_us_p50: 1.0,
            decision_us_p99: 2.0,
            off_target: false,
            curve: curve
                .iter()
                .map(|&(share, _, quality)| CurvePoint { share, quality })
                .collect(),
            curve_cost: curve
                .iter()
                .map(|&(_, cost_usd, quality)| CostPoint { cost_usd, quality })
                .collect(),
        }
    }

    fn report() -> EvalReport {
        // Shares in grid order; the dollars are not monotone in share (0.5 costs less than 0.4).
        let curve: Vec<(f64, f64, f64)> = (0..11)
            .map(|i| {
                let share = i as f64 / 10.0;
                let cost = if i == 5 { 2.0 } else { 0.05 + 5.0 * share };
                (share, cost, 0.64 + 0.2 * share)
            })
            .collect();
        EvalReport {
            data: "x/gsm8k.jsonl".into(),
            items: 100,
            skipped_lines: 0,
            weak: "mixtral".into(),
            strong: "gpt-4".into(),
            q_weak: 0.64,
            q_strong: 0.86,
            seed: 0,
            target_share: 0.3,
            explore: 0.1,
            grid: 11,
            max_strong_calls: None,
            max_usd: None,
            router_metadata: true,
            router_vectors: None,
            prior_trained_on: None,
            cost_weight: 0.0,
            cost_weak_usd: Some(0.04),
            cost_strong_usd: Some(5.39),
            policies: vec![
                row("always-weak", "none", &[]),
                row("random", "none", &curve),
                row("cascade", "full", &curve),
                row("router", "partial", &curve),
            ],
        }
    }

    #[test]
    fn cost_curves_run_cheapest_first() {
        let r = report();
        let pts = cost_curve(&r.policies[1].curve_cost);
        assert_eq!(pts.len(), 11);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0), "{pts:?}");
        // The cheap 50% run ($2.00) moved ahead of the 40% one ($2.05), its quality with it.
        assert_eq!(pts[4], (2.0, 0.74));
        assert!((pts[5].0 - 2.05).abs() < 1e-9 && (pts[5].1 - 0.72).abs() < 1e-9);
    }

    #[test]
    fn the_cost_plot_is_written_beside_the_share_plot_and_names_every_policy() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("out/r.svg");
        let cost = cost_plot_path(&share);
        assert_eq!(cost, dir.path().join("out/r-cost.svg"));
        let r = report();
        write_plot(&r, &share).unwrap();
        write_cost_plot(&r, &cost).unwrap();
        write_cost_plot(&r, &cost.with_extension("png")).unwrap();
        let svg = std::fs::read_to_string(&cost).unwrap();
        for name in [
            "always-weak",
            "random",
            "cascade (full)",
            "router (partial)",
            "mixtral alone ($0.04)",
            "gpt-4 alone ($5.39)",
            "quality vs dollars spent",
        ] {
            assert!(svg.contains(name), "{name} missing from the cost plot");
        }
        assert!(std::fs::metadata(cost.with_extension("png")).unwrap().len() > 1000);
    }

    /// The x of every SVG text element whose content contains `label`.
    fn text_x(svg: &str, label: &str) -> Vec<f64> {
        svg.split("<text")
            .filter(|t| t.split('>').nth(1).is_some_and(|c| c.contains(label)))
            .filter_map(|t| t.split("x=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect()
    }

    /// Each model's point is labelled once (the always-X row at the same point is not labelled
    /// again); a point near the right edge has its label inside the chart.
    #[test]
    fn the_cost_plot_labels_each_point_once_and_inside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let mut r = report();
        let (weak_cost, strong_cost) = (r.cost_weak_usd.unwrap(), r.cost_strong_usd.unwrap());
        let at = |name: &str, cost: f64, quality: f64| {
            let mut p = row(name, "none", &[]);
            p.cost_usd = cost;
            p.quality = quality;
            p
        };
        // Uncapped: the always-X rows are the models alone.
        r.policies[0] = at("always-weak", weak_cost, r.q_weak);
        r.policies
            .push(at("always-strong", strong_cost, r.q_strong));
        write_cost_plot(&r, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text_x(&svg, "always-weak").len(), 0, "labelled twice");
        assert_eq!(text_x(&svg, "always-strong").len(), 0, "labelled twice");
        assert_eq!(text_x(&svg, "gpt-4 alone").len(), 1);
        assert_eq!(text_x(&svg, "mixtral alone").len(), 1);
        // Capped: always-strong spent less than the strong model alone, near the right edge.
        for share in [0.9, 0.97, 1.0] {
            let last = r.policies.len() - 1;
            r.policies[last] = at("always-strong", share * strong_cost, 0.8);
            write_cost_plot(&r, &path).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            let xs = text_x(&svg, "always-strong");
            assert_eq!(xs.len(), 1, "{share}");
            // 13 characters of about 7 px must end before the 900 px wide image's edge.
            assert!(xs[0] + 13.0 * 7.0 < 900.0, "{share}: label at x {}", xs[0]);
        }
    }
}
