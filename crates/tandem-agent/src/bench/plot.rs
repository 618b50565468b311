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
        if let Some(sd) = r.success_sd {
            // A success rate lives in [0, 1]; so does its bar.
            chart
                .draw_series([PathElement::new(
                    [(x, (y - sd).max(0.0)), (x, (y + sd).min(1.0))],
                    c.stroke_width(1),
                )])
                .map_err(e)?;
        }
    }
    // Labels in pixels: placed beside their point where free, else nearby with a leader line,
    // never over another label or outside the plot.
    let font = ("sans-serif", 12).into_font();
    // What a label must not cover: the markers and the error bars.
    let mut obstacles: Vec<Rect> = Vec::new();
    for r in rows {
        obstacles.push(dot(chart.backend_coord(&(r.large_share, r.success))));
        obstacles.push(dot(chart.backend_coord(&(r.large_share, r.score))));
        if let Some(sd) = r.success_sd {
            let top = chart.backend_coord(&(r.large_share, (r.success + sd).min(1.0)));
            let bottom = chart.backend_coord(&(r.large_share, (r.success - sd).max(0.0)));
            obstacles.push(Rect {
                x0: top.0 - 1,
                y0: top.1,
                x1: top.0 + 2,
                y1: bottom.1 + 1,
            });
        }
    }
    let mut labels = Vec::new();
    for r in rows {
        let size = root
            .estimate_text_size(&r.name, &TextStyle::from(font.clone()))
            .map_err(e)?;
        labels.push((chart.backend_coord(&(r.large_share, r.success)), size));
    }
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let bounds = Rect {
        x0: xs.start,
        y0: ys.start,
        x1: xs.end,
        y1: ys.end,
    };
    let placed = place_labels(&labels, &obstacles, bounds);
    for ((r, (anchor, _)), at) in rows.iter().zip(&labels).zip(&placed) {
        let c = color(&r.name);
        let (w, h) = (at.x1 - at.x0, at.y1 - at.y0);
        let near = (at.x0 - 1..=at.x1 + 1).contains(&anchor.0)
            || (at.x0 - anchor.0).abs() < 12
            || (anchor.0 - at.x1).abs() < 12;
        if !near || (at.y0 + h / 2 - anchor.1).abs() > h {
            // The label sits away from its point: a thin line joins them.
            let end = (
                anchor.0.clamp(at.x0, at.x0 + w),
                anchor.1.clamp(at.y0, at.y1),
            );
            root.draw(&PathElement::new(
                [*anchor, end],
                c.mix(0.5).stroke_width(1),
            ))
            .map_err(e)?;
        }
        root.draw(&Text::new(r.name.clone(), (at.x0, at.y0), font.color(&c)))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// A label to place: its point and its (width, height), in pixels.
pub(crate) type Label = ((i32, i32), (u32, u32));

/// A box in pixels: `x0 <= x < x1`, `y0 <= y < y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rect {
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
}

impl Rect {
    fn overlap(&self, o: &Rect) -> i64 {
        let w = (self.x1.min(o.x1) - self.x0.max(o.x0)).max(0);
        let h = (self.y1.min(o.y1) - self.y0.max(o.y0)).max(0);
        i64::from(w) * i64::from(h)
    }

    fn inside(&self, b: &Rect) -> bool {
        self.x0 >= b.x0 && self.y0 >= b.y0 && self.x1 <= b.x1 && self.y1 <= b.y1
    }
}

/// A marker's box: a 5 px circle around `(x, y)`.
pub(crate) fn dot((x, y): (i32, i32)) -> Rect {
    Rect {
        x0: x - 5,
        y0: y - 5,
        x1: x + 6,
        y1: y + 6,
    }
}

/// Where to put each label (anchor point, (width, height) in pixels) so that it stays inside
/// `bounds`, overlaps no label placed before it and no obstacle (markers, error bars): tried
/// beside the point first (right, left, above, below), then stepping away vertically and
/// sideways. Where nothing is free (more labels than room), the spot with the least overlap
/// inside the bounds.
pub(crate) fn place_labels(labels: &[Label], obstacles: &[Rect], bounds: Rect) -> Vec<Rect> {
    const GAP: i32 = 7;
    let mut placed: Vec<Rect> = Vec::new();
    for &((ax, ay), (w, h)) in labels {
        let (w, h) = (w as i32 + 2, h as i32 + 2);
        let mut candidates = Vec::new();
        // Beside the point, then farther and farther above and below it.
        for step in 0..40 {
            let dy = (step / 2 + step % 2) * h * if step % 2 == 0 { 1 } else { -1 };
            let y = ay - h / 2 + dy;
            for x in [
                ax + GAP,
                ax - GAP - w,
                ax - w / 2,
                ax + 3 * GAP,
                ax - 3 * GAP - w,
            ] {
                candidates.push(Rect {
                    x0: x,
                    y0: y,
                    x1: x + w,
                    y1: y + h,
                });
            }
            if step == 0 {
                for y in [ay - GAP - h, ay + GAP] {
                    candidates.push(Rect {
                        x0: ax - w / 2,
                        y0: y,
                        x1: ax - w / 2 + w,
                        y1: y + h,
                    });
                }
            }
        }
        let fit = |r: &Rect| -> Rect {
            // Shifted inside the bounds (a label wider than the plot keeps its left edge in).
            let dx = (bounds.x1 - r.x1).min(0).max(bounds.x0 - r.x0);
            let dy = (bounds.y1 - r.y1).min(0).max(bounds.y0 - r.y0);
            Rect {
                x0: r.x0 + dx,
                y0: r.y0 + dy,
                x1: r.x1 + dx,
                y1: r.y1 + dy,
            }
        };
        let clash = |r: &Rect| -> i64 {
            placed.iter().map(|p| p.overlap(r) * 4).sum::<i64>()
                + obstacles.iter().map(|m| m.overlap(r)).sum::<i64>()
        };
        let free = candidates
            .iter()
            .find(|r| r.inside(&bounds) && clash(r) == 0)
            .copied();
        let best = free.unwrap_or_else(|| {
            candidates
                .iter()
                .map(fit)
                .min_by_key(|r| clash(r))
                .unwrap_or_else(|| fit(&candidates[0]))
        });
        placed.push(best);
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Rect = Rect {
        x0: 60,
        y0: 40,
        x1: 880,
        y1: 500,
    };

    fn check(labels: &[Label], markers: &[(i32, i32)]) -> Vec<Rect> {
        let obstacles: Vec<Rect> = markers.iter().map(|&m| dot(m)).collect();
        let placed = place_labels(labels, &obstacles, BOUNDS);
        assert_eq!(placed.len(), labels.len());
        for (i, a) in placed.iter().enumerate() {
            assert!(a.inside(&BOUNDS), "label {i} at {a:?} leaves {BOUNDS:?}");
            for m in &obstacles {
                assert_eq!(a.overlap(m), 0, "label {i} {a:?} covers {m:?}");
            }
            for (j, b) in placed.iter().enumerate().skip(i + 1) {
                assert_eq!(a.overlap(b), 0, "labels {i} {a:?} and {j} {b:?} overlap");
            }
        }
        placed
    }

    #[test]
    fn labels_of_clustered_points_do_not_overlap() {
        // Nine rows within a few pixels of each other (LONDI and random at one share).
        let labels: Vec<_> = (0..9)
            .map(|i| ((400 + i % 3, 200 + i / 3), (110, 14)))
            .collect();
        let markers: Vec<_> = labels.iter().map(|l| l.0).collect();
        check(&labels, &markers);
    }

    #[test]
    fn labels_at_the_edges_stay_inside() {
        // always-large at 100% share and 100% success: the right and top edges.
        let labels = [
            ((880, 40), (90, 14)),
            ((870, 45), (120, 14)),
            ((60, 500), (90, 14)),
            ((62, 498), (150, 14)),
            ((879, 499), (100, 14)),
        ];
        let markers: Vec<_> = labels.iter().map(|l| l.0).collect();
        let placed = check(&labels, &markers);
        // Free spots beside the point are used: the first label sits left of its point.
        assert!(placed[0].x1 <= 880 - 7 + 1, "{:?}", placed[0]);
    }

    #[test]
    fn a_lone_label_sits_right_beside_its_point_clear_of_markers() {
        let placed = check(&[((300, 300), (80, 14))], &[(300, 300), (300, 280)]);
        let r = placed[0];
        assert_eq!(r.x0, 307);
        assert!((r.y0..r.y1).contains(&300), "{r:?}");
    }

    #[test]
    fn labels_avoid_error_bars() {
        // A tall bar just right of a point: the label goes elsewhere.
        let bar = Rect {
            x0: 310,
            y0: 200,
            x1: 313,
            y1: 400,
        };
        let placed = place_labels(&[((300, 300), (80, 14))], &[dot((300, 300)), bar], BOUNDS);
        assert_eq!(placed[0].overlap(&bar), 0, "{:?}", placed[0]);
        assert_eq!(placed[0].overlap(&dot((300, 300))), 0);
    }

    #[test]
    fn a_plot_renders_every_name_and_keeps_bars_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.svg");
        let row = |name: &str, share: f64, success: f64, sd: Option<f64>| super::super::Row {
            name: name.into(),
            kind: "londi",
            cost: None,
            budget: None,
            threshold: None,
            target_share: None,
            matches: Vec::new(),
            random_row: None,
            random_at_share: None,
            vs_random: None,
            success,
            success_sd: sd,
            score: success,
            score_sd: None,
            large_seconds: 0.0,
            large_seconds_sd: None,
            large_share: share,
            large_share_sd: None,
            large_calls_per_episode: 0.0,
            large_calls_per_episode_sd: None,
            max_large_calls: 0,
            steps_per_episode: 1.0,
            per_seed: Vec::new(),
        };
        let rows = vec![
            row("always-large", 1.0, 1.0, Some(0.2)),
            row("always-small", 0.0, 0.6, None),
            row("LONDI c=0.02", 0.46, 0.956, Some(0.01)),
            row("random 46%", 0.46, 0.944, Some(0.03)),
        ];
        plot_frontier(&rows, "t", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for r in &rows {
            assert!(svg.contains(&r.name), "{} missing", r.name);
        }
    }
}
