//! Human-readable figures the way qemu-img prints them.

/// A size as qemu-img's `size_to_str` prints it: three significant digits
/// and a binary unit chosen so the figure stays below 1000
/// ("64 MiB", "204 KiB", "1.5 GiB", "0 B").
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0usize;
    // Largest unit in which the figure is still below 1000.
    while unit + 1 < UNITS.len() && (bytes as f64) / ((1u64 << (10 * unit)) as f64) >= 1000.0 {
        unit += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}", g3(v), UNITS[unit])
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    // |v| < 1e4 here, so the exponent is a small integer.
    #[allow(clippy::cast_possible_truncation)]
    let exp = v.abs().log10().floor() as i32;
    // Round to three significant digits first; rounding may carry (999.7).
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    let rounded: f64 = s.parse().unwrap_or(v);
    if rounded >= 1000.0 {
        #[allow(clippy::cast_possible_truncation)]
        let e = rounded.log10().floor() as i32;
        let mant = rounded / 10f64.powi(e);
        return format!("{}e+{e:02}", trim(&format!("{mant:.2}")));
    }
    trim(&s)
}

fn trim(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(super::size(0), "0 B");
        assert_eq!(super::size(512), "512 B");
        assert_eq!(super::size(208896), "204 KiB");
        assert_eq!(super::size(67108864), "64 MiB");
        assert_eq!(super::size(18845696), "18 MiB");
        assert_eq!(super::size(3 << 29), "1.5 GiB");
        assert_eq!(super::size(1000), "0.977 KiB");
        assert_eq!(super::size(4 << 40), "4 TiB");
        assert_eq!(super::size(10240000), "9.77 MiB");
    }
}
