//! Printing admin API answers as a table (for people) or JSON (for scripts).

use serde_json::Value;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Prints `value` (an object or a list of objects) with the given columns.
pub fn print(format: Format, value: &Value, columns: &[&str]) -> anyhow::Result<()> {
    let mut out = String::new();
    match format {
        Format::Json => out = serde_json::to_string_pretty(value)?,
        Format::Table => {
            let rows: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            let cells: Vec<Vec<String>> =
                rows.iter().map(|row| columns.iter().map(|c| cell(lookup(row, c))).collect()).collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.len()]).max().unwrap_or(0))
                .collect();
            let line = |values: Vec<String>| {
                values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            out.push_str(&line(columns.iter().map(|c| c.to_uppercase()).collect()));
            for row in cells {
                out.push('\n');
                out.push_str(&line(row));
            }
        }
    }
    write_stdout(&out)
}

/// A plain line on standard output (the secret of a new key, a cursor).
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

fn lookup<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |v, part| &v[part])
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "*".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
