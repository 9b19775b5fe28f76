//! Progress of a remote command, shown on stderr while the answer is awaited.

use std::io::IsTerminal;

use tollgate_coordinator::render;
use tollgate_protocol::ctl::ProgressEvent;

/// Shows progress events on stderr: bars on a terminal, plain lines otherwise.
#[derive(Debug)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    /// `quiet` (under `--json`) shows nothing.
    pub fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !quiet).then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} steps  {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        Progress {
            bar,
            plain: !tty && !quiet,
        }
    }

    pub fn on(&mut self, p: &ProgressEvent) {
        let what = render::progress_line(p);
        if let Some(b) = &self.bar {
            b.set_length(u64::from(p.total));
            b.set_position(u64::from(p.done));
            b.println(format!("  {what}"));
            b.set_message(what);
        } else if self.plain {
            eprintln!("  {what}");
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
