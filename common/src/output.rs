//! How every CLI listing prints: `-o table` (plain-text columns that fit
//! their content, as `kubectl get` prints them), `-o json` or `-o yaml`.

use std::fmt;

use serde::Serialize;

/// The `-o`/`--output` flag of every listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `rows` in `output`: the table `table` builds, or the rows
/// themselves as a JSON or YAML list (the same fields, camelCase).
pub fn print<T: Serialize>(output: Output, rows: &T, table: impl FnOnce() -> Table) -> Result<(), String> {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(rows).map_err(|e| e.to_string())?),
        Output::Yaml => print!("{}", crate::yaml::to_string(rows).map_err(|e| e.to_string())?),
    }
    Ok(())
}

#[derive(Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

// === impl Table ===

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}   ", w = width[i]));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_the_widest_cell() {
        let mut t = Table::new(&["A", "BB", "C"]);
        t.row(vec!["long cell".into(), "x".into(), "last".into()]);
        t.row(vec!["s".into(), "yyy".into(), "".into()]);
        assert_eq!(t.to_string(), "A           BB    C\nlong cell   x     last\ns           yyy\n");
    }
}
