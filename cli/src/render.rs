//! The one way a command's result reaches the terminal: each result implements [`Render`]
//! (text for people, JSON for programs) and [`Format`], chosen once from the global `--json`,
//! prints one of the two.

use std::io::Write;

use serde_json::Value;

use super::CliError;

/// How results are printed, from the global `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Tables and sentences for people; notes on stderr.
    Text,
    /// One pretty-printed JSON document on stdout (a followed job: one object per line).
    Json,
}

impl Format {
    /// Prints `result` in this format: its text on stdout and its notes on stderr, or its
    /// JSON on stdout.
    pub fn print(self, result: &impl Render, now_ms: i64) -> Result<(), CliError> {
        match self {
            Format::Json => print_json(&result.json()),
            Format::Text => {
                print!("{}", result.text(now_ms));
                let notes = result.notes(now_ms);
                if !notes.is_empty() {
                    let _ = write!(std::io::stderr(), "{notes}");
                }
                Ok(())
            }
        }
    }
}

/// A command's result, rendered for people or for programs.
pub trait Render {
    /// What a person sees on stdout, exactly, line ends included (`now_ms` for "5m ago").
    fn text(&self, now_ms: i64) -> String;
    /// What a person is told on stderr after the text (hints, warnings); never with `--json`.
    fn notes(&self, _now_ms: i64) -> String {
        String::new()
    }
    /// The JSON document `--json` prints.
    fn json(&self) -> Value;
}

/// `text` and a line end: most results are one table or one sentence.
pub fn line(text: impl std::fmt::Display) -> String {
    format!("{text}\n")
}

/// A list whose items render as JSON one by one and as text all together: most list commands
/// (`drover hosts`, `drover jobs`, ...).
pub struct List<'a, T> {
    pub items: &'a [T],
    /// One item's JSON object.
    pub json: fn(&T) -> Value,
    /// The whole list for people (a table, or a sentence when it is empty), without the line end.
    pub table: fn(&[T], i64) -> String,
}

impl<T> Render for List<'_, T> {
    fn text(&self, now_ms: i64) -> String {
        line((self.table)(self.items, now_ms))
    }
    fn json(&self) -> Value {
        Value::Array(self.items.iter().map(self.json).collect())
    }
}

fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_a_json_array_or_its_table_and_a_line_end() {
        let items = [1_i64, 2];
        let list = List {
            items: &items,
            json: |n| Value::from(*n),
            table: |ns, now| format!("{ns:?} at {now}"),
        };
        assert_eq!(list.text(7), "[1, 2] at 7\n");
        assert_eq!(list.json(), serde_json::json!([1, 2]));
        assert_eq!(list.notes(7), "");
    }
}
