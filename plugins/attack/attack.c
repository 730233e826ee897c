/*
 * attack: a TEST plugin that does what a malicious plugin would, for tests/tests/sandbox.rs.
 * It is never loaded by anything but the sandbox tests; do not ship it.
 *
 * Every method takes RAW input bytes (not MessagePack): a UTF-8 argument string, possibly
 * empty. Every method returns PLUGIN_OK with RAW UTF-8 output, one of
 *   "ok: <detail>"                          the attack worked
 *   "denied: <ERRNO_NAME> (<strerror>) ..." it failed, e.g. "denied: EACCES (Permission
 *                                           denied) in open"; the words after the
 *                                           parenthesis name the call that failed
 *   "denied: <WORD> (<explanation>)"        it failed without an errno (not set, signal...)
 * so a test can assert on the second word.
 *
 * Methods:
 *   ping                     "pong" (harmless)
 *   read_file PATH           ok: the file's first 64 bytes
 *   create_file PATH         O_CREAT|O_EXCL|O_WRONLY 0600, writes "pwned"; ok: PATH
 *   write_file PATH          appends "\n# pwned\n" to an existing file (its own plugin.toml)
 *   list_dir PATH            ok: the entry names
 *   tcp_connect HOST:PORT    IPv4 TCP connect
 *   udp_send HOST:PORT       IPv4 UDP sendto of a few bytes
 *   dns_query HOST:PORT      a DNS query for example.com over UDP; waits 500 ms for an answer
 *   kill_parent              kill(getppid(), SIGKILL)
 *   kill_pid PID             kill(PID, SIGKILL)
 *   signal_pid PID           kill(PID, 0): the permission check of kill without the harm
 *   read_proc PID/FILE       opens and reads /proc/PID/FILE (mem: pread at 0x400000)
 *   vm_read PID              process_vm_readv of 8 bytes of PID's memory
 *   ptrace_attach PID        PTRACE_ATTACH (and detach if it worked)
 *   exec_sh                  fork + execve("/bin/sh", "-c", "exit 42")
 *   pidfd_getfd PID FD       pidfd_open(PID) then pidfd_getfd(FD): steal another process's fd
 *   getenv NAME              ok: the value of an environment variable
 *   open_fds                 ok: the fds 0..1023 that are open, with their type (memfd: a
 *                            regular file with seals, the worker's shared region)
 *   log_forge                logs and reports progress with a newline and an escape sequence
 *   spawn_orphan TAG         double fork + setsid: a process named "orph-TAG" that pauses
 *                            forever with every fd closed
 *   spawn_orphan_stderr TAG  the same, but the orphan keeps stderr (fd 2) open: the pipe
 *                            the host reads the worker's stderr from
 *   unshare_user             unshare(CLONE_NEWUSER) (in a single-threaded child)
 *   connect_abstract NAME    connects to the abstract unix socket "\0NAME"
 *   shm_read KEY             shmget(KEY) + shmat: reads another process's System V shared
 *                            memory (ok: its first bytes)
 *   fork_many N              forks up to N children that wait (a fork bomb, bounded): ok if
 *                            all N started, else denied with fork's errno; all are killed
 *                            and reaped before it returns
 *   bogus_output LEN         returns PLUGIN_OK with a 16-byte malloc'd buffer whose len says
 *                            LEN (a decimal number, e.g. 18446744073709551615): a buffer
 *                            length that lies
 *
 * Only libc; builds warning-free with -Wall -Werror (tests/build.rs).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "plugin_api.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define OUT_MAX 4096

/* ---- output ------------------------------------------------------------------------- */

typedef struct Out {
    char text[OUT_MAX];
    size_t len;
} Out;

static void out_add(Out *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void out_add(Out *out, const char *fmt, ...) {
    if (out->len >= OUT_MAX - 1) {
        return;
    }
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(out->text + out->len, OUT_MAX - out->len, fmt, args);
    va_end(args);
    if (n < 0) {
        return;
    }
    out->len += (size_t)n;
    if (out->len > OUT_MAX - 1) {
        out->len = OUT_MAX - 1;
    }
}

/* Appends bytes that may be anything, keeping the output printable UTF-8-safe ASCII. */
static void out_add_bytes(Out *out, const unsigned char *bytes, size_t len) {
    for (size_t i = 0; i < len; i++) {
        unsigned char c = bytes[i];
        if (c >= 0x20 && c < 0x7f) {
            out_add(out, "%c", c);
        } else if (c == '\n') {
            out_add(out, "\\n");
        } else {
            out_add(out, "\\x%02x", c);
        }
    }
}

static const char *errno_name(int e) {
    switch (e) {
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case ENOSYS: return "ENOSYS";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EPROTONOSUPPORT: return "EPROTONOSUPPORT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EROFS: return "EROFS";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case EOPNOTSUPP: return "EOPNOTSUPP"; /* == ENOTSUP on Linux */
    case EAGAIN: return "EAGAIN";
    case ENOTCONN: return "ENOTCONN";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EFAULT: return "EFAULT";
    case EIO: return "EIO";
    case ENOMEM: return "ENOMEM";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ECHILD: return "ECHILD";
    case EBUSY: return "EBUSY";
    case EXDEV: return "EXDEV";
    case ENXIO: return "ENXIO";
    case ENODEV: return "ENODEV";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EADDRINUSE: return "EADDRINUSE";
    case ENETDOWN: return "ENETDOWN";
    case ECONNRESET: return "ECONNRESET";
    case EUSERS: return "EUSERS";
    case ENOSPC: return "ENOSPC";
    case ELOOP: return "ELOOP";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    default: return NULL;
    }
}

/* "denied: EACCES (Permission denied) in STEP" */
static void out_denied(Out *out, int e, const char *step) {
    const char *name = errno_name(e);
    out->len = 0;
    if (name != NULL) {
        out_add(out, "denied: %s (%s) in %s", name, strerror(e), step);
    } else {
        out_add(out, "denied: E%d (%s) in %s", e, strerror(e), step);
    }
}

/* ---- small helpers ------------------------------------------------------------------ */

/* Copies the raw input into a NUL-terminated string (truncated to cap - 1 bytes). */
static void arg_string(const uint8_t *input, size_t len, char *buf, size_t cap) {
    if (len > cap - 1) {
        len = cap - 1;
    }
    memcpy(buf, input, len);
    buf[len] = '\0';
}

static int parse_pid(const char *text, pid_t *pid) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || (*end != '\0' && *end != ' ' && *end != '/')) {
        return -1;
    }
    *pid = (pid_t)value;
    return 0;
}

/* "HOST:PORT" (IPv4) -> sockaddr_in; -1 if malformed. */
static int parse_addr(const char *text, struct sockaddr_in *addr) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof host) {
        return -1;
    }
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &addr->sin_addr) != 1) {
        return -1;
    }
    return 0;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Waits up to `ms` for `pid`; kills it if it is still running then. Returns waitpid's
 * status, or -1 (errno set) if waiting failed. */
static int wait_child(pid_t pid, long ms, int *status) {
    for (long waited = 0;; waited += 5) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid) {
            return 0;
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
        if (waited >= ms) {
            kill(pid, SIGKILL);
            while (waitpid(pid, status, 0) < 0 && errno == EINTR) {
            }
            return 0;
        }
        sleep_ms(5);
    }
}

static const char *fd_type(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) {
        return "?";
    }
    switch (st.st_mode & S_IFMT) {
    /* Only a memfd has seals: the worker's shared region (anonymous memory, no file). */
    case S_IFREG: return fcntl(fd, F_GET_SEALS) >= 0 ? "memfd" : "reg";
    case S_IFSOCK: return "sock";
    case S_IFIFO: return "fifo";
    case S_IFCHR: return "chr";
    case S_IFDIR: return "dir";
    case S_IFBLK: return "blk";
    case S_IFLNK: return "lnk";
    default: return "other";
    }
}

/* ---- the attacks -------------------------------------------------------------------- */

static void do_read_file(const char *path, Out *out) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        out_denied(out, errno, "open");
        return;
    }
    unsigned char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    int e = errno;
    close(fd);
    if (n < 0) {
        out_denied(out, e, "read");
        return;
    }
    out_add(out, "ok: ");
    out_add_bytes(out, buf, (size_t)n);
}

static int write_all(int fd, const char *text) {
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        text += n;
        len -= (size_t)n;
    }
    return 0;
}

static void do_create_file(const char *path, Out *out) {
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) {
        out_denied(out, errno, "open");
        return;
    }
    int failed = write_all(fd, "pwned");
    int e = errno;
    close(fd);
    if (failed) {
        out_denied(out, e, "write");
        return;
    }
    out_add(out, "ok: %s", path);
}

static void do_write_file(const char *path, Out *out) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) {
        out_denied(out, errno, "open");
        return;
    }
    int failed = write_all(fd, "\n# pwned\n");
    int e = errno;
    close(fd);
    if (failed) {
        out_denied(out, e, "write");
        return;
    }
    out_add(out, "ok: appended to %s", path);
}

static void do_list_dir(const char *path, Out *out) {
    DIR *dir = opendir(path);
    if (dir == NULL) {
        out_denied(out, errno, "opendir");
        return;
    }
    out_add(out, "ok:");
    for (;;) {
        errno = 0;
        struct dirent *entry = readdir(dir);
        if (entry == NULL) {
            int e = errno;
            if (e != 0) {
                closedir(dir);
                out_denied(out, e, "readdir");
                return;
            }
            break;
        }
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) {
            continue;
        }
        out_add(out, " %s", entry->d_name);
    }
    closedir(dir);
}

static void do_tcp_connect(const char *arg, Out *out) {
    struct sockaddr_in addr;
    if (parse_addr(arg, &addr) != 0) {
        out_denied(out, EINVAL, "parsing HOST:PORT");
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        out_denied(out, errno, "socket");
        return;
    }
    struct timeval timeout = {2, 0}; /* bounds connect() too */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int e = errno;
        close(fd);
        out_denied(out, e, "connect");
        return;
    }
    close(fd);
    out_add(out, "ok: connected to %s", arg);
}

static void do_udp_send(const char *arg, const uint8_t *packet, size_t packet_len, int wait_answer,
                        Out *out) {
    struct sockaddr_in addr;
    if (parse_addr(arg, &addr) != 0) {
        out_denied(out, EINVAL, "parsing HOST:PORT");
        return;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        out_denied(out, errno, "socket");
        return;
    }
    ssize_t sent = sendto(fd, packet, packet_len, 0, (struct sockaddr *)&addr, sizeof addr);
    if (sent < 0) {
        int e = errno;
        close(fd);
        out_denied(out, e, "sendto");
        return;
    }
    if (wait_answer) {
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, 500) == 1) {
            uint8_t answer[512];
            ssize_t n = recv(fd, answer, sizeof answer, 0);
            if (n >= 0) {
                close(fd);
                out_add(out, "ok: answer %zd bytes", n);
                return;
            }
        }
    }
    close(fd);
    out_add(out, "ok: sent %zd bytes", sent);
}

static void do_dns_query(const char *arg, Out *out) {
    /* Header: id 0x1234, flags RD, 1 question; then example.com A IN. */
    static const uint8_t query[] = {
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm', 0,
        0x00, 0x01, 0x00, 0x01,
    };
    do_udp_send(arg, query, sizeof query, 1, out);
}

/* Whether `pid` is gone or a zombie. */
static int is_dead(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) {
        return 1;
    }
    char path[64];
    char stat[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0) {
        return 0;
    }
    stat[n] = '\0';
    const char *paren = strrchr(stat, ')');
    return paren != NULL && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

static void do_kill(pid_t pid, int sig, const char *what, Out *out) {
    if (kill(pid, sig) != 0) {
        out_denied(out, errno, "kill");
        return;
    }
    if (sig == 0) {
        out_add(out, "ok: may signal %s %d", what, (int)pid);
        return;
    }
    /* kill() returns 0 for a SIGKILL sent to the init of our own pid namespace, which
     * ignores it: say whether the target really went away. */
    int parent = strcmp(what, "parent") == 0;
    for (int i = 0; i < 40; i++) {
        if (is_dead(pid) || (parent && getppid() != pid)) {
            out_add(out, "ok: killed %s %d", what, (int)pid);
            return;
        }
        sleep_ms(5);
    }
    out_add(out, "denied: survived (kill() returned 0 but %s %d is still alive 200 ms later)",
            what, (int)pid);
}

static void do_read_proc(const char *arg, Out *out) {
    char path[1100]; /* "/proc/" + an argument of up to 1023 bytes */
    snprintf(path, sizeof path, "/proc/%s", arg);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        out_denied(out, errno, "open");
        return;
    }
    unsigned char buf[64];
    size_t len = strlen(path);
    int is_mem = len >= 4 && strcmp(path + len - 4, "/mem") == 0;
    ssize_t n = is_mem ? pread(fd, buf, 8, 0x400000) : read(fd, buf, sizeof buf);
    int e = errno;
    close(fd);
    if (n < 0) {
        /* Opening it is the breach (mem needs ptrace access to open); say so. */
        const char *name = errno_name(e);
        out_add(out, "ok: opened %s; read failed: %s (%s)", path, name ? name : "?",
                strerror(e));
        return;
    }
    out_add(out, "ok: opened %s; read %zd bytes: ", path, n);
    out_add_bytes(out, buf, (size_t)n);
}

/* The start of the first mapping of `pid`, from /proc/PID/maps, or 0x400000. */
static unsigned long first_mapping(pid_t pid) {
    char path[64];
    char text[128];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 0x400000;
    }
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) {
        return 0x400000;
    }
    text[n] = '\0';
    unsigned long start = strtoul(text, NULL, 16);
    return start != 0 ? start : 0x400000;
}

static void do_vm_read(pid_t pid, Out *out) {
    unsigned char buf[8];
    unsigned long address = first_mapping(pid);
    struct iovec local = {buf, sizeof buf};
    struct iovec remote = {(void *)address, sizeof buf};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n < 0) {
        out_denied(out, errno, "process_vm_readv");
        return;
    }
    out_add(out, "ok: read %zd bytes at 0x%lx: ", n, address);
    out_add_bytes(out, buf, (size_t)n);
}

static void do_ptrace_attach(pid_t pid, Out *out) {
    if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) != 0) {
        out_denied(out, errno, "ptrace(PTRACE_ATTACH)");
        return;
    }
    int status = 0;
    waitpid(pid, &status, __WALL);
    ptrace(PTRACE_DETACH, pid, NULL, NULL);
    out_add(out, "ok: attached to %d (and detached)", (int)pid);
}

/* Runs `child` in a forked child that reports an errno (0 = success) through a pipe, or
 * execs. Returns 0 with *child_errno and *status set, or -1 with errno and *step set. */
static int fork_and_report(void (*child)(int report_fd, void *arg), void *arg, int *child_errno,
                           int *status, const char **step) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        *step = "pipe2";
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        errno = e;
        *step = "fork";
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        child(fds[1], arg);
        _exit(127);
    }
    close(fds[1]);
    int reported = 0;
    ssize_t n;
    do {
        /* Bounded: every child here exits or execs at once; EOF comes with either. */
        struct pollfd pfd = {fds[0], POLLIN, 0};
        if (poll(&pfd, 1, 5000) != 1) {
            n = 0;
            break;
        }
        n = read(fds[0], &reported, sizeof reported);
    } while (n < 0 && errno == EINTR);
    close(fds[0]);
    *child_errno = n == (ssize_t)sizeof reported ? reported : 0;
    if (wait_child(pid, 5000, status) != 0) {
        *step = "waitpid";
        return -1;
    }
    return 0;
}

static void report_errno(int fd, int e) {
    ssize_t ignored = write(fd, &e, sizeof e);
    (void)ignored;
}

static void exec_sh_child(int report_fd, void *arg) {
    (void)arg;
    char *const argv[] = {"sh", "-c", "exit 42", NULL};
    char *const envp[] = {NULL};
    execve("/bin/sh", argv, envp);
    report_errno(report_fd, errno);
}

static void describe_status(int status, Out *out) {
    if (WIFSIGNALED(status)) {
        out_add(out, "denied: %s (killed by signal %d)",
                WTERMSIG(status) == SIGSYS ? "SIGSYS" : "SIGNAL", WTERMSIG(status));
    } else {
        out_add(out, "denied: EXIT (the child exited with status %d)", WEXITSTATUS(status));
    }
}

static void do_exec_sh(Out *out) {
    int child_errno = 0, status = 0;
    const char *step = NULL;
    if (fork_and_report(exec_sh_child, NULL, &child_errno, &status, &step) != 0) {
        out_denied(out, errno, step);
        return;
    }
    if (child_errno != 0) {
        out_denied(out, child_errno, "execve");
        return;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 42) {
        out_add(out, "ok: /bin/sh ran and exited 42");
        return;
    }
    describe_status(status, out);
}

static void do_pidfd_getfd(const char *arg, Out *out) {
    pid_t pid;
    int target_fd = 0;
    if (parse_pid(arg, &pid) != 0) {
        out_denied(out, EINVAL, "parsing PID FD");
        return;
    }
    const char *space = strchr(arg, ' ');
    if (space != NULL) {
        target_fd = atoi(space + 1);
    }
    long pidfd = syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        out_denied(out, errno, "pidfd_open");
        return;
    }
    long fd = syscall(SYS_pidfd_getfd, (int)pidfd, target_fd, 0);
    if (fd < 0) {
        int e = errno;
        close((int)pidfd);
        out_denied(out, e, "pidfd_getfd");
        return;
    }
    out_add(out, "ok: got fd %d of %d as our fd %ld (%s)", target_fd, (int)pid, fd,
            fd_type((int)fd));
    close((int)fd);
    close((int)pidfd);
}

static void do_shm_read(const char *arg, Out *out) {
    key_t key = (key_t)strtol(arg, NULL, 0);
    int id = shmget(key, 0, 0);
    if (id < 0) {
        out_denied(out, errno, "shmget");
        return;
    }
    void *at = shmat(id, NULL, SHM_RDONLY);
    if (at == (void *)-1) {
        out_denied(out, errno, "shmat");
        return;
    }
    char head[17];
    memcpy(head, at, 16);
    head[16] = '\0';
    shmdt(at);
    out_add(out, "ok: %s", head);
}

static void do_fork_many(const char *arg, Out *out) {
    long n = strtol(arg, NULL, 10);
    if (n <= 0 || n > 4096) {
        out_denied(out, EINVAL, "parsing N");
        return;
    }
    pid_t *pids = calloc((size_t)n, sizeof(pid_t));
    if (pids == NULL) {
        out_denied(out, ENOMEM, "calloc");
        return;
    }
    long started = 0;
    int failure = 0;
    for (; started < n; started++) {
        pid_t pid = fork();
        if (pid < 0) {
            failure = errno;
            break;
        }
        if (pid == 0) {
            for (;;) {
                pause();
            }
        }
        pids[started] = pid;
    }
    for (long i = 0; i < started; i++) {
        kill(pids[i], SIGKILL);
        waitpid(pids[i], NULL, 0);
    }
    free(pids);
    if (failure != 0) {
        out_denied(out, failure, "fork");
        out_add(out, " after %ld", started);
    } else {
        out_add(out, "ok: %ld forked", started);
    }
}

static void do_getenv(const char *name, Out *out) {
    const char *value = getenv(name);
    if (value == NULL) {
        out_add(out, "denied: not set (environment)");
        return;
    }
    out_add(out, "ok: %s", value);
}

static void do_open_fds(Out *out) {
    out_add(out, "ok:");
    for (int fd = 0; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) != -1) {
            out_add(out, " %d:%s", fd, fd_type(fd));
        }
    }
}

static void do_log_forge(const PluginHostContext *host, Out *out) {
    static const char msg[] = "innocent line\nERROR forged host line\x1b[31m";
    static const char progress[] = "step\nERROR forged progress line\x1b[31m";
    host->log(host->data, PLUGIN_LOG_INFO, (const uint8_t *)msg, sizeof msg - 1);
    host->progress(host->data, 0.5, (const uint8_t *)progress, sizeof progress - 1);
    out_add(out, "ok: logged");
}

typedef struct OrphanArgs {
    char name[16];
    int keep_stderr;
} OrphanArgs;

/* The middle child: new session, fork the orphan, report, exit. Async-signal-safe calls
 * only (the worker is multi-threaded). */
static void orphan_middle(int report_fd, void *arg) {
    OrphanArgs *args = arg;
    if (setsid() < 0) {
        report_errno(report_fd, errno);
        _exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        report_errno(report_fd, errno);
        _exit(1);
    }
    if (pid == 0) {
        prctl(PR_SET_NAME, args->name, 0, 0, 0);
        for (int fd = 0; fd < 1024; fd++) {
            if (!(args->keep_stderr && fd == 2)) {
                close(fd);
            }
        }
        for (;;) {
            pause();
        }
    }
    report_errno(report_fd, 0);
    _exit(0);
}

static void do_spawn_orphan(const char *tag, int keep_stderr, Out *out) {
    OrphanArgs args;
    snprintf(args.name, sizeof args.name, "orph-%s", tag);
    args.keep_stderr = keep_stderr;
    int child_errno = 0, status = 0;
    const char *step = NULL;
    if (fork_and_report(orphan_middle, &args, &child_errno, &status, &step) != 0) {
        out_denied(out, errno, step);
        return;
    }
    if (child_errno != 0) {
        out_denied(out, child_errno, "setsid or the second fork");
        return;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        describe_status(status, out);
        return;
    }
    out_add(out, "ok: spawned %s", args.name);
}

static void unshare_child(int report_fd, void *arg) {
    (void)arg;
    report_errno(report_fd, unshare(CLONE_NEWUSER) == 0 ? 0 : errno);
    _exit(0);
}

static void do_unshare_user(Out *out) {
    int child_errno = 0, status = 0;
    const char *step = NULL;
    /* unshare(CLONE_NEWUSER) needs a single-threaded caller: try it in a child. */
    if (fork_and_report(unshare_child, NULL, &child_errno, &status, &step) != 0) {
        int fork_errno = errno;
        if (unshare(CLONE_NEWUSER) != 0) {
            int e = errno;
            const char *name = errno_name(fork_errno);
            out_denied(out, e, "unshare (in the multi-threaded worker");
            out_add(out, ", since %s failed with %s)", step, name ? name : "?");
            return;
        }
        out_add(out, "ok: unshared a user namespace");
        return;
    }
    if (WIFSIGNALED(status)) {
        describe_status(status, out);
        return;
    }
    if (child_errno != 0) {
        out_denied(out, child_errno, "unshare");
        return;
    }
    out_add(out, "ok: unshared a user namespace (in a child)");
}

static void do_connect_abstract(const char *name, Out *out) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t len = strlen(name);
    if (len > sizeof addr.sun_path - 1) {
        out_denied(out, ENAMETOOLONG, "building the address");
        return;
    }
    memcpy(addr.sun_path + 1, name, len);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        out_denied(out, errno, "socket");
        return;
    }
    socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
    if (connect(fd, (struct sockaddr *)&addr, addr_len) != 0) {
        int e = errno;
        close(fd);
        out_denied(out, e, "connect");
        return;
    }
    close(fd);
    out_add(out, "ok: connected to @%s", name);
}

/* ---- the ABI ------------------------------------------------------------------------ */

static int32_t put_out(PluginBuffer *buffer, const Out *out) {
    buffer->ptr = NULL;
    buffer->len = 0;
    buffer->cap = 0;
    if (out->len == 0) {
        return 0;
    }
    buffer->ptr = malloc(out->len);
    if (buffer->ptr == NULL) {
        return -1;
    }
    memcpy(buffer->ptr, out->text, out->len);
    buffer->len = out->len;
    buffer->cap = out->len;
    return 0;
}

static int32_t attack_create(const PluginHostContext *host, const uint8_t *config,
                             size_t config_len, void **instance, PluginBuffer *error) {
    (void)host;
    (void)config;
    (void)config_len;
    (void)error;
    static int state;
    *instance = &state;
    return PLUGIN_OK;
}

static int method_is(const uint8_t *method, size_t len, const char *name) {
    return strlen(name) == len && memcmp(method, name, len) == 0;
}

static int32_t attack_call(void *instance, const uint8_t *method, size_t method_len,
                           const uint8_t *input, size_t input_len, const PluginHostContext *host,
                           PluginBuffer *output) {
    (void)instance;
    static Out empty;
    Out *out = malloc(sizeof(Out));
    if (out == NULL) {
        put_out(output, &empty);
        return PLUGIN_ERROR;
    }
    out->len = 0;
    out->text[0] = '\0';
    char arg[1024];
    arg_string(input, input_len, arg, sizeof arg);
    pid_t pid = 0;
    int32_t status = PLUGIN_OK;

#define METHOD(name) method_is(method, method_len, name)
#define NEED_PID()                                                                       \
    if (parse_pid(arg, &pid) != 0) {                                                     \
        out_denied(out, EINVAL, "parsing PID");                                          \
    } else

    if (METHOD("ping")) {
        out_add(out, "pong");
    } else if (METHOD("read_file")) {
        do_read_file(arg, out);
    } else if (METHOD("create_file")) {
        do_create_file(arg, out);
    } else if (METHOD("write_file")) {
        do_write_file(arg, out);
    } else if (METHOD("list_dir")) {
        do_list_dir(arg, out);
    } else if (METHOD("tcp_connect")) {
        do_tcp_connect(arg, out);
    } else if (METHOD("udp_send")) {
        static const uint8_t packet[] = "attack";
        do_udp_send(arg, packet, sizeof packet - 1, 0, out);
    } else if (METHOD("dns_query")) {
        do_dns_query(arg, out);
    } else if (METHOD("kill_parent")) {
        do_kill(getppid(), SIGKILL, "parent", out);
    } else if (METHOD("kill_pid")) {
        NEED_PID() do_kill(pid, SIGKILL, "process", out);
    } else if (METHOD("signal_pid")) {
        NEED_PID() do_kill(pid, 0, "process", out);
    } else if (METHOD("read_proc")) {
        do_read_proc(arg, out);
    } else if (METHOD("vm_read")) {
        NEED_PID() do_vm_read(pid, out);
    } else if (METHOD("ptrace_attach")) {
        NEED_PID() do_ptrace_attach(pid, out);
    } else if (METHOD("exec_sh")) {
        do_exec_sh(out);
    } else if (METHOD("pidfd_getfd")) {
        do_pidfd_getfd(arg, out);
    } else if (METHOD("getenv")) {
        do_getenv(arg, out);
    } else if (METHOD("open_fds")) {
        do_open_fds(out);
    } else if (METHOD("log_forge")) {
        do_log_forge(host, out);
    } else if (METHOD("spawn_orphan")) {
        do_spawn_orphan(arg, 0, out);
    } else if (METHOD("spawn_orphan_stderr")) {
        do_spawn_orphan(arg, 1, out);
    } else if (METHOD("bogus_output")) {
        char *end = NULL;
        errno = 0;
        unsigned long long len = strtoull(arg, &end, 10);
        if (errno != 0 || end == arg || *end != '\0') {
            out_denied(out, EINVAL, "parsing LEN");
        } else {
            out_add(out, "0123456789abcdef");
            if (put_out(output, out) != 0) {
                free(out);
                return PLUGIN_ERROR;
            }
            free(out);
            output->len = (size_t)len;
            return PLUGIN_OK;
        }
    } else if (METHOD("unshare_user")) {
        do_unshare_user(out);
    } else if (METHOD("connect_abstract")) {
        do_connect_abstract(arg, out);
    } else if (METHOD("shm_read")) {
        do_shm_read(arg, out);
    } else if (METHOD("fork_many")) {
        do_fork_many(arg, out);
    } else {
        out_add(out, "attack has no such method");
        status = PLUGIN_UNKNOWN_METHOD;
    }
#undef NEED_PID
#undef METHOD

    if (put_out(output, out) != 0) {
        status = PLUGIN_ERROR;
    }
    free(out);
    return status;
}

static void attack_free_buffer(PluginBuffer buffer) { free(buffer.ptr); }

static void attack_destroy(void *instance) { (void)instance; }

#define STR(s) {(const uint8_t *)(s), sizeof(s) - 1}

static const PluginStr METHODS[] = {
    STR("ping"),        STR("read_file"),     STR("create_file"),  STR("write_file"),
    STR("list_dir"),    STR("tcp_connect"),   STR("udp_send"),     STR("dns_query"),
    STR("kill_parent"), STR("kill_pid"),      STR("signal_pid"),   STR("read_proc"),
    STR("vm_read"),     STR("ptrace_attach"), STR("exec_sh"),      STR("pidfd_getfd"),
    STR("getenv"),      STR("open_fds"),      STR("log_forge"),    STR("spawn_orphan"),
    STR("unshare_user"), STR("connect_abstract"), STR("fork_many"),
    STR("shm_read"),    STR("spawn_orphan_stderr"), STR("bogus_output"),
};

static const PluginDescriptor DESCRIPTOR = {
    PLUGIN_API_ABI_MAJOR,
    PLUGIN_API_ABI_MINOR,
    "attack",
    "1.0.0",
    METHODS,
    sizeof METHODS / sizeof METHODS[0],
    attack_create,
    attack_call,
    attack_free_buffer,
    attack_destroy,
};

const PluginDescriptor *plugin_api_entry(void) { return &DESCRIPTOR; }
