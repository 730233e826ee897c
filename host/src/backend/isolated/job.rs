//! Windows: the Job Object that holds one worker and everything it starts.
//!
//! Closing the job's last handle (the host dropped the worker, or the host process died)
//! kills every process in it; [`Job::terminate`] kills them at once (deadlines, pings,
//! shutdown). The job also carries the worker's limits: memory per process, CPU time,
//! and one process when the plugin was not granted `exec`. Wine keeps the job and its
//! kill-on-close but ignores the memory, CPU and process-count limits: on Wine those are
//! reported as not in force ([`Job::not_enforced`]).

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};

use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectBasicAccountingInformation,
    JobObjectExtendedLimitInformation, QueryInformationJobObject, SetInformationJobObject,
    TerminateJobObject, JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_ACTIVE_PROCESS,
    JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    JOB_OBJECT_LIMIT_PROCESS_MEMORY, JOB_OBJECT_LIMIT_PROCESS_TIME,
};

use crate::manifest::Limits;
use crate::protocol::WireSandbox;

/// The exit code the processes of a terminated job get.
pub(crate) const TERMINATED_EXIT_CODE: u32 = 1;

/// A Job Object (closing it kills its processes).
pub(crate) struct Job {
    handle: OwnedHandle,
    not_enforced: Vec<String>,
}

impl Job {
    /// A job with kill-on-close and the limits of `limits` (and one process unless the
    /// sandbox grants `exec`).
    pub fn new(limits: &Limits, sandbox: Option<&WireSandbox>) -> io::Result<Job> {
        // SAFETY: default security, no name.
        let raw = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if raw.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a valid handle we just created and nobody else owns.
        let handle = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
        // SAFETY: plain data; all zero means "no limits".
        let mut info: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = unsafe { std::mem::zeroed() };
        let basic = &mut info.BasicLimitInformation;
        basic.LimitFlags =
            JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE | JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION;
        let mut limited = Vec::new();
        if let Some(bytes) = limits.memory {
            basic.LimitFlags |= JOB_OBJECT_LIMIT_PROCESS_MEMORY;
            info.ProcessMemoryLimit = usize::try_from(bytes).unwrap_or(usize::MAX);
            limited.push("memory limit (limits.memory)");
        }
        if let Some(cpu) = limits.cpu {
            basic.LimitFlags |= JOB_OBJECT_LIMIT_PROCESS_TIME;
            // In 100-nanosecond units.
            basic.PerProcessUserTimeLimit = i64::try_from(cpu.as_nanos() / 100).unwrap_or(i64::MAX);
            limited.push("CPU-time limit (limits.cpu)");
        }
        if sandbox.is_some_and(|s| !s.exec) {
            basic.LimitFlags |= JOB_OBJECT_LIMIT_ACTIVE_PROCESS;
            basic.ActiveProcessLimit = 1;
            limited.push("one process (exec not granted)");
        }
        // SAFETY: a valid job handle; `info` is the structure this class takes, with its
        // exact size.
        let set = unsafe {
            SetInformationJobObject(
                raw,
                JobObjectExtendedLimitInformation,
                (&info as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            )
        };
        if set == 0 {
            return Err(io::Error::last_os_error());
        }
        let not_enforced = match wine_version() {
            Some(wine) => limited
                .into_iter()
                .map(|l| format!("{l}: Wine {wine} does not enforce a job's limits"))
                .collect(),
            None => Vec::new(),
        };
        Ok(Job {
            handle,
            not_enforced,
        })
    }

    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle() as HANDLE
    }

    /// Puts the process `process` (a handle to it) in the job.
    pub fn assign(&self, process: RawHandle) -> io::Result<()> {
        // SAFETY: valid job and process handles.
        if unsafe { AssignProcessToJobObject(self.raw(), process as HANDLE) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills every process in the job.
    pub fn terminate(&self) {
        // SAFETY: a valid job handle.
        unsafe { TerminateJobObject(self.raw(), TERMINATED_EXIT_CODE) };
    }

    /// How many processes in the job are still running (`None`: cannot tell).
    pub fn active_processes(&self) -> Option<u32> {
        // SAFETY: plain data, filled in by the call.
        let mut info: JOBOBJECT_BASIC_ACCOUNTING_INFORMATION = unsafe { std::mem::zeroed() };
        // SAFETY: a valid job handle; `info` is the structure this class fills, with its
        // exact size.
        let ok = unsafe {
            QueryInformationJobObject(
                self.raw(),
                JobObjectBasicAccountingInformation,
                (&mut info as *mut JOBOBJECT_BASIC_ACCOUNTING_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                std::ptr::null_mut(),
            )
        };
        (ok != 0).then_some(info.ActiveProcesses)
    }

    /// The limits asked for that this system does not enforce (Wine), one line each.
    pub fn not_enforced(&self) -> &[String] {
        &self.not_enforced
    }
}

/// Wine's version, when running under Wine (its ntdll exports `wine_get_version`).
pub(crate) fn wine_version() -> Option<String> {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    let ntdll: Vec<u16> = "ntdll.dll".encode_utf16().chain([0]).collect();
    // SAFETY: a NUL-terminated UTF-16 name; ntdll is loaded in every process.
    let module = unsafe { GetModuleHandleW(ntdll.as_ptr()) };
    if module.is_null() {
        return None;
    }
    // SAFETY: a valid module handle and a NUL-terminated name.
    let f = unsafe { GetProcAddress(module, c"wine_get_version".as_ptr().cast()) }?;
    // SAFETY: Wine's `const char *wine_get_version(void)`, returning a static string.
    let version = unsafe {
        let f: unsafe extern "C" fn() -> *const std::ffi::c_char = std::mem::transmute(f);
        std::ffi::CStr::from_ptr(f())
    };
    Some(version.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::windows::io::AsRawHandle;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A process that runs for a few seconds unless killed.
    fn sleeper() -> Child {
        Command::new("cmd.exe")
            .args(["/c", "ping", "-n", "6", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    #[test]
    fn terminating_the_job_ends_its_process_with_the_job_exit_code() {
        let job = Job::new(&Limits::default(), None).unwrap();
        let mut child = sleeper();
        job.assign(child.as_raw_handle()).unwrap();
        assert_ne!(job.active_processes(), Some(0));
        job.terminate();
        let status = exit_within(&mut child, Duration::from_secs(5)).expect("ended");
        assert_eq!(status.code(), Some(TERMINATED_EXIT_CODE as i32));
    }

    #[test]
    fn closing_the_job_ends_its_process() {
        let job = Job::new(&Limits::default(), None).unwrap();
        let mut child = sleeper();
        job.assign(child.as_raw_handle()).unwrap();
        drop(job);
        assert!(
            exit_within(&mut child, Duration::from_secs(5)).is_some(),
            "the process outlived its job"
        );
    }
}
