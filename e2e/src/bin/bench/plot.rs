//! The density benchmark's plot: p50 latency of each CRI call against the pods running, one line
//! per runtime and call, as a PNG.
//!
//! Drawn with `plotters` (bitmap backend into an RGB buffer, no features that need the system's
//! fonts or a font file: plotters' text support wants a TTF at run time or font-kit and
//! fontconfig) and encoded by `png`; its few words (axis values, legend) are drawn pixel by pixel
//! from `font8x8`'s public-domain 8x8 glyphs, scaled, so the plot builds offline from crates.io
//! and looks the same on every machine.

use std::path::Path;

use plotters::prelude::*;

/// One line of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// 0: cri-systemd (solid), 1: containerd (dashed look: points only on a thinner line).
    pub runtime: usize,
    /// Which call: picks the colour.
    pub call: usize,
    /// (pods running, p50 in ms)
    pub points: Vec<(f64, f64)>,
}

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 640;
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
];
/// Plot area inside the picture: left, top, right, bottom margins.
const MARGIN: (i32, i32, i32, i32) = (80, 48, 520, 60);

/// Writes the plot of `series` to `path` (PNG). Latency axis from 0, pods axis from 0.
pub fn latency_vs_pods(path: &Path, series: &[Series]) -> Result<(), String> {
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buffer, series).map_err(|e| format!("plot: {e}"))?;
    let file = std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| format!("write {}: {e}", path.display()))?;
    writer.write_image_data(&buffer).map_err(|e| format!("write {}: {e}", path.display()))?;
    writer.finish().map_err(|e| format!("write {}: {e}", path.display()))
}

fn draw(buffer: &mut [u8], series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buffer, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1.0, f64::max);
    let max_y = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(1.0, f64::max);
    let (max_x, max_y) = (nice_ceiling(max_x), nice_ceiling(max_y));
    let (left, top, right, bottom) = MARGIN;
    let (x0, y0, x1, y1) = (left, top, WIDTH as i32 - right, HEIGHT as i32 - bottom);
    let to_px = |x: f64, y: f64| {
        (
            (x0 as f64 + x / max_x * (x1 - x0) as f64).round() as i32,
            (y1 as f64 - y / max_y * (y1 - y0) as f64).round() as i32,
        )
    };

    // Grid, axes and their values.
    let grey = RGBColor(220, 220, 220);
    for i in 0..=5 {
        let (x, _) = to_px(max_x * i as f64 / 5.0, 0.0);
        let (_, y) = to_px(0.0, max_y * i as f64 / 5.0);
        root.draw(&PathElement::new(vec![(x, y0), (x, y1)], grey))?;
        root.draw(&PathElement::new(vec![(x0, y), (x1, y)], grey))?;
        text(&root, x - 12, y1 + 8, &format_value(max_x * i as f64 / 5.0), 2, &BLACK)?;
        let value = format_value(max_y * i as f64 / 5.0);
        text(&root, x0 - 10 - 16 * value.len() as i32, y - 8, &value, 2, &BLACK)?;
    }
    root.draw(&PathElement::new(vec![(x0, y0), (x0, y1), (x1, y1)], BLACK.stroke_width(2)))?;
    text(&root, (x0 + x1) / 2 - 100, y1 + 36, "pods running", 2, &BLACK)?;
    text(&root, 8, 8, "p50 latency, ms", 2, &BLACK)?;
    text(&root, x0 + 260, 12, "thick line, dots: cri-systemd; thin line, squares: containerd", 1, &BLACK)?;

    // The lines, and the legend on the right.
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[s.call % COLOURS.len()];
        let points: Vec<(i32, i32)> = s.points.iter().map(|(x, y)| to_px(*x, *y)).collect();
        let style = if s.runtime == 0 { colour.stroke_width(3) } else { colour.stroke_width(1) };
        root.draw(&PathElement::new(points.clone(), style))?;
        for p in &points {
            if s.runtime == 0 {
                root.draw(&Circle::new(*p, 4, colour.filled()))?;
            } else {
                root.draw(&Rectangle::new([(p.0 - 4, p.1 - 4), (p.0 + 4, p.1 + 4)], colour.stroke_width(2)))?;
            }
        }
        let ly = y0 + 24 * i as i32;
        root.draw(&PathElement::new(vec![(x1 + 16, ly + 4), (x1 + 46, ly + 4)], style))?;
        text(&root, x1 + 54, ly - 4, &s.label, 2, &colour)?;
    }
    root.present()?;
    Ok(())
}

/// `value` rounded up to 1, 2 or 5 times a power of ten (the axis' end).
pub fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|v| *v >= value * 0.999_999).unwrap_or(10.0 * power)
}

/// An axis value: whole numbers plainly, small ones with one decimal.
pub fn format_value(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// `s` in font8x8's glyphs at `scale` (8 pixels a glyph, times scale), top left at (x, y).
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    s: &str,
    scale: i32,
    colour: &RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for (i, c) in s.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY.get(c as usize).copied().unwrap_or([0; 8]);
        let gx = x + i as i32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                // Bit 0 is the leftmost pixel.
                if bits & (1 << col) != 0 {
                    let (px, py) = (gx + col * scale, y + row as i32 * scale);
                    for (dx, dy) in (0..scale).flat_map(|dx| (0..scale).map(move |dy| (dx, dy))) {
                        area.draw_pixel((px + dx, py + dy), colour)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ends_are_round() {
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(nice_ceiling(1001.0), 2000.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(format_value(200.0), "200");
        assert_eq!(format_value(0.5), "0.5");
    }

    #[test]
    fn a_plot_is_a_png() {
        let path = std::env::temp_dir().join(format!("bench-plot-test-{}.png", std::process::id()));
        let series = vec![
            Series { label: "cs RunPodSandbox".into(), runtime: 0, call: 0, points: vec![(10.0, 7.0), (100.0, 8.0)] },
            Series {
                label: "ctd RunPodSandbox".into(),
                runtime: 1,
                call: 0,
                points: vec![(10.0, 70.0), (100.0, 90.0)],
            },
        ];
        latency_vs_pods(&path, &series).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));
    }
}
