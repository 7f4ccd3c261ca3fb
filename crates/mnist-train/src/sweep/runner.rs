//! Training runs as child processes: `--jobs` at once, each an ordinary `train` of the current program
//! with its output in a log file beside its run folder, stopped cleanly on Ctrl-C.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::SweepError;
use crate::{read_json, RunResults, INTERRUPTED_EXIT_CODE, RESULTS_FILE};

/// How often running children are polled (and the stop flag looked at).
const POLL: Duration = Duration::from_millis(100);
/// Lines of a failed run's log quoted in the error.
const LOG_TAIL_LINES: usize = 3;

/// One `train` process to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The recipe's name.
    pub recipe: String,
    /// The run's seed.
    pub seed: u64,
    /// The run folder.
    pub dir: PathBuf,
    /// The arguments after the program name (`train ...`).
    pub args: Vec<String>,
}

impl Job {
    /// The log of the run's process: `<run folder>.log` beside the folder.
    pub fn log(&self) -> PathBuf {
        log_path(&self.dir)
    }
}

/// `<run folder>.log`, beside the folder (so the folder holds exactly what `train` writes).
pub fn log_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".log");
    dir.with_file_name(name)
}

/// Runs [`Job`]s as child processes of `program`.
pub struct Launcher<'a> {
    /// The program (the running solution binary).
    pub program: PathBuf,
    /// Processes at once.
    pub jobs: usize,
    /// `RAYON_NUM_THREADS` of each process.
    pub threads: usize,
    /// Set by Ctrl-C: no new process starts, and the running ones are asked to stop (SIGINT).
    pub stop: &'a AtomicBool,
}

struct Running {
    job: Job,
    child: Child,
    started: Instant,
}

impl Launcher<'_> {
    /// Threads per process: the cores shared evenly, at least one each.
    pub fn threads_for(jobs: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / jobs.max(1)).max(1)
    }

    /// Runs every job, `self.jobs` at once, calling `done` with each finished run's results and its
    /// wall-clock seconds. After a failure no new job starts; the running ones finish and the first
    /// failure is returned. On a stop request the running processes are sent SIGINT (each keeps its last
    /// complete epoch's checkpoint) and [`SweepError::Interrupted`] is returned once all have exited.
    pub fn run(
        &self,
        jobs: Vec<Job>,
        done: &mut dyn FnMut(&Job, &RunResults, f64),
    ) -> Result<(), SweepError> {
        let mut pending: VecDeque<Job> = jobs.into();
        let mut running: Vec<Running> = Vec::new();
        let mut failure: Option<SweepError> = None;
        let mut forwarded = false;
        let mut interrupted = 0usize;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            if stopping && !forwarded {
                for r in &running {
                    interrupt(&r.child);
                }
                forwarded = true;
            }
            while !stopping && failure.is_none() && running.len() < self.jobs {
                let Some(job) = pending.pop_front() else {
                    break;
                };
                match self.spawn(&job) {
                    Ok(child) => running.push(Running {
                        job,
                        child,
                        started: Instant::now(),
                    }),
                    Err(e) => failure = Some(e),
                }
            }
            if running.is_empty() {
                break;
            }
            std::thread::sleep(POLL);
            let mut i = 0;
            while i < running.len() {
                let status = match running[i].child.try_wait() {
                    Ok(Some(status)) => status,
                    Ok(None) => {
                        i += 1;
                        continue;
                    }
                    Err(source) => {
                        let r = running.swap_remove(i);
                        failure.get_or_insert(SweepError::Io {
                            path: r.job.dir.clone(),
                            source,
                        });
                        continue;
                    }
                };
                let r = running.swap_remove(i);
                let seconds = r.started.elapsed().as_secs_f64();
                if status.success() {
                    match read_json::<RunResults>(&r.job.dir.join(RESULTS_FILE)) {
                        Ok(results) => done(&r.job, &results, seconds),
                        Err(e) => {
                            failure.get_or_insert(SweepError::Train(e));
                        }
                    }
                } else if self.stop.load(Ordering::SeqCst) && was_interrupted(status) {
                    interrupted += 1;
                } else {
                    failure.get_or_insert(failed(&r.job, status));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if self.stop.load(Ordering::SeqCst) {
            return Err(SweepError::Interrupted {
                unfinished: interrupted + pending.len(),
            });
        }
        Ok(())
    }

    fn spawn(&self, job: &Job) -> Result<Child, SweepError> {
        let log = job.log();
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SweepError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let io = |source| SweepError::Io {
            path: log.clone(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&job.args)
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            // The log says what train says (one line per epoch), whatever the sweep's own level.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        #[cfg(unix)]
        {
            // A process group of its own: a Ctrl-C at the terminal reaches the sweep only, which asks
            // each run to stop exactly once (a second SIGINT would end a run at once).
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        tracing::debug!(dir = %job.dir.display(), "starting {} {}", self.program.display(), job.args.join(" "));
        cmd.spawn().map_err(|source| SweepError::Spawn {
            program: self.program.clone(),
            source,
        })
    }
}

/// Asks a child to stop as Ctrl-C would (SIGINT): it finishes its batch and keeps its checkpoint.
#[cfg(unix)]
fn interrupt(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet reaped (so not reused).
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
    }
}

#[cfg(not(unix))]
fn interrupt(_child: &Child) {
    // Elsewhere the console delivers Ctrl-C to the children too.
}

/// True when a run ended because it was stopped by a signal (exit code 130, or killed by SIGINT).
fn was_interrupted(status: ExitStatus) -> bool {
    if status.code() == Some(i32::from(INTERRUPTED_EXIT_CODE)) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if status.signal().is_some() {
            return true;
        }
    }
    false
}

fn failed(job: &Job, status: ExitStatus) -> SweepError {
    let log = job.log();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join(" | ");
    SweepError::RunFailed {
        recipe: job.recipe.clone(),
        seed: job.seed,
        status: status.to_string(),
        log,
        tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_lies_beside_the_run_folder() {
        assert_eq!(
            log_path(Path::new("out/base/seed-3")),
            PathBuf::from("out/base/seed-3.log")
        );
    }

    #[test]
    fn threads_share_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Launcher::threads_for(1), cores);
        assert_eq!(Launcher::threads_for(cores * 4), 1);
    }
}
