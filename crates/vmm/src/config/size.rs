//! Sizes as people write them: `512M`, `4G`, `1.5G`, `65536`, `64KiB`.

/// Parses a byte count with an optional binary suffix (K, M, G, T; `iB`/`B` allowed).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches("IB").trim_end_matches('B');
    let bad = || {
        format!(
            "'{text}' is not a size; write a number with an optional K, M, G or T suffix (e.g. 512M)"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit; use K, M, G or T (e.g. 512M)"
            ));
        }
    };
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * (1u64 << shift) as f64;
        if !b.is_finite() || b >= u64::MAX as f64 {
            return Err(bad());
        }
        b as u64
    } else {
        let v: u64 = num.parse().map_err(|_| bad())?;
        v.checked_mul(1 << shift).ok_or_else(bad)?
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("65536"), Ok(65536));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "12Q", "-1G", "1..2M", "99999999999999T", "1e3M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
