//! Numeric `--flag N` arguments of the measuring programs: an unknown flag
//! or a value that is not a whole number is refused with the usage line,
//! never replaced by a default.

/// The program's flags (each followed by a whole number) and usage line.
pub struct Flags {
    program: &'static str,
    usage: &'static str,
    args: Vec<String>,
}

impl Flags {
    /// This process's arguments, every flag checked.
    pub fn parse(
        program: &'static str,
        flags: &'static [&'static str],
        usage: &'static str,
    ) -> Self {
        let me = Self {
            program,
            usage,
            args: std::env::args().collect(),
        };
        let unknown = me
            .args
            .iter()
            .skip(1)
            .step_by(2)
            .find(|a| !flags.contains(&a.as_str()));
        if let Some(bad) = unknown {
            me.refuse(&format!("unknown argument {bad:?}"));
        }
        me
    }

    fn refuse(&self, why: &str) -> ! {
        eprintln!("{}: {why}\nusage: {}", self.program, self.usage);
        std::process::exit(2)
    }

    /// The whole number after `flag`, `default` if the flag is absent.
    pub fn get(&self, flag: &str, default: u64) -> u64 {
        match self.args.iter().position(|a| a == flag) {
            None => default,
            Some(i) => match self.args.get(i + 1).map(|v| v.parse()) {
                Some(Ok(n)) => n,
                _ => self.refuse(&format!("{flag} needs a whole number")),
            },
        }
    }
}
