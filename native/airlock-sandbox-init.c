/*
 * airlock-sandbox-init: pid 1 of an Airlock sandbox, and its command's last steps before exec.
 *
 * The supervisor (airlock/sandbox/contain.py, a Python process) unshares a new pid namespace
 * and starts this program with posix_spawn, so it is pid 1 there. Until it existed, init and
 * the command were forks of the supervisor: two copies of a ~25 MB Python image per dry run,
 * whose page faults and page-table copies were a quarter of a dry run's CPU (docs/decisions.md
 * section 37). Nothing here decides anything: every path, fd and program comes from the
 * supervisor's plan (airlock/sandbox/init.py writes the arguments and reads the reports).
 *
 *   init:    default signals; parent-death signal; close every fd it was not given; a mount
 *            namespace of its own; the plan's steps (mount /proc, read-only rebinds, pivot_root);
 *            "R" on the status pipe; fork the command; wait for it, reaping orphans; then give
 *            the processes it left running up to the grace to end on their own (reaping them);
 *            report "S" + wait status + 1 byte: 1 if some were still running, else 0 (or "E" +
 *            the command's set-up failure); exit, which kills what is left.
 *   command: join the cgroup ("0" to each cgroup.procs fd); stdio; empty the bounding and
 *            ambient capability sets and lock the securebits; read the run spec (blocks in a
 *            warm sandbox until a request comes); close every other fd; become the caller
 *            (groups, gid, uid, no capabilities, no_new_privs); chdir; the deny filter; the
 *            process tracer's notification filter, its listener sent to the supervisor; exec.
 *            A failed step writes "KIND\0STEP: [Errno N] TEXT" to the error pipe, which init
 *            reads (empty once the exec closed it).
 *
 * Arguments (in this order of meaning, options in any order, steps in plan order):
 *   --proc PATH | --ro PATH | --pivot PATH   init's mount steps, carried out in the given order
 *   --procs N          cgroup.procs descriptors at fds 15 .. 15+N-1 (N <= 16)
 *   --trace            fd 14 is the process tracer's channel
 *   --last-cap N       the kernel's last capability (/proc/sys/kernel/cap_last_cap)
 *   --seccomp HEX      the deny filter (classic BPF, 8 bytes per instruction)
 *   --trace-filter HEX the tracer's notification filter
 *   --grace-ms N       how long processes the command left running may go on after it exited
 *                      (N <= 60000; 0, the default: not at all)
 * Descriptors: 10 run spec (read), 11 status (write), 12 stdout, 13 stderr.
 * Run spec (fd 10, until EOF): "AIS1", u32 uid, gid, ngroups, argc, envc (native byte order),
 * u32 groups[ngroups], then NUL-terminated: cwd, argv[argc], env[envc] ("NAME=VALUE").
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { FD_SPEC = 10, FD_STATUS = 11, FD_OUT = 12, FD_ERR = 13, FD_TRACE = 14, FD_PROCS = 15 };
enum { MAX_PROCS = 16, MAX_STEPS = 64, MAX_SPEC = 32 << 20, MAX_BPF = 4096 };

#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
/* noroot, no_setuid_fixup, keep_caps_locked, no_cap_ambient_raise: each bit and its lock. */
#define SECUREBITS_LOCKED_DOWN 0xEF

struct step {
  char kind; /* 'p' proc, 'r' read-only rebind, 'v' pivot_root */
  const char *path;
};

struct bpf {
  struct sock_filter *insns;
  unsigned short len;
};

struct config {
  struct step steps[MAX_STEPS];
  int nsteps;
  int nprocs;
  int trace;
  int last_cap;
  int grace_ms;
  struct bpf deny;
  struct bpf notify;
};

static void write_all(int fd, const char *buf, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, buf, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    buf += w;
    n -= (size_t)w;
  }
}

/* After the command exited: wait up to grace_ms for the processes it left running (now all
 * descendants of pid 1) to end on their own, reaping them, so that what they do is part of the
 * dry run. 1 if some still run at the end (killed when init exits: what they would have done
 * next is not seen), 0 once init has no child left. */
static int left_running(int grace_ms) {
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    pid_t pid = waitpid(-1, NULL, WNOHANG);
    if (pid > 0) continue;
    if (pid < 0) {
      if (errno == EINTR) continue;
      return 0; /* ECHILD: nothing is left */
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    long waited_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
    if (waited_ms >= grace_ms) return 1;
    struct timespec tick = {0, 2 * 1000 * 1000}; /* 2 ms */
    nanosleep(&tick, NULL);
  }
}

/* --- init ----------------------------------------------------------------------------------- */

/* "Esetup\0sandbox init: WHAT: TEXT" on the status pipe, then exit: the supervisor reports it. */
static void init_fail(const char *what, const char *path, int err) {
  char msg[4096];
  int n = snprintf(msg, sizeof msg, "Esetup%csandbox init: %s%s%s: %s", '\0', what,
                   path ? " " : "", path ? path : "", strerror(err));
  if (n > 0) write_all(FD_STATUS, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
  _exit(0);
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

static void parse_bpf(const char *hex, struct bpf *out) {
  size_t n = strlen(hex);
  if (n == 0 || n % 16 || n / 16 > MAX_BPF) init_fail("arguments", "bpf", EINVAL);
  unsigned char *bytes = malloc(n / 2);
  if (!bytes) init_fail("arguments", "bpf", ENOMEM);
  for (size_t i = 0; i < n / 2; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) init_fail("arguments", "bpf", EINVAL);
    bytes[i] = (unsigned char)(hi << 4 | lo);
  }
  out->insns = (struct sock_filter *)bytes;
  out->len = (unsigned short)(n / 16);
}

static int parse_count(const char *s, int max) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < 0 || v > max) init_fail("arguments", s, EINVAL);
  return (int)v;
}

static void parse_args(int argc, char **argv, struct config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->last_cap = 63;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--trace") == 0) {
      cfg->trace = 1;
      continue;
    }
    if (!v) init_fail("arguments", a, EINVAL);
    i++;
    if (strcmp(a, "--proc") == 0 || strcmp(a, "--ro") == 0 || strcmp(a, "--pivot") == 0) {
      if (cfg->nsteps == MAX_STEPS) init_fail("arguments", a, E2BIG);
      cfg->steps[cfg->nsteps].kind = a[2] == 'p' && a[3] == 'r' ? 'p' : a[2] == 'r' ? 'r' : 'v';
      cfg->steps[cfg->nsteps++].path = v;
    } else if (strcmp(a, "--procs") == 0) {
      cfg->nprocs = parse_count(v, MAX_PROCS);
    } else if (strcmp(a, "--last-cap") == 0) {
      cfg->last_cap = parse_count(v, 63);
    } else if (strcmp(a, "--grace-ms") == 0) {
      cfg->grace_ms = parse_count(v, 60000);
    } else if (strcmp(a, "--seccomp") == 0) {
      parse_bpf(v, &cfg->deny);
    } else if (strcmp(a, "--trace-filter") == 0) {
      parse_bpf(v, &cfg->notify);
    } else {
      init_fail("arguments", a, EINVAL);
    }
  }
  if (cfg->trace && !cfg->notify.len) init_fail("arguments", "--trace-filter", EINVAL);
}

/* Default dispositions and an empty mask: an ignored signal survives fork and exec, and the
 * spawner ignores SIGINT and SIGTERM. Inherited by the command through fork. */
static void default_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  for (int sig = 1; sig < _NSIG; sig++) {
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &sa, NULL); /* 32, 33: EINVAL */
  }
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
}

static void close_from(unsigned int first) {
  if (syscall(SYS_close_range, first, ~0U, 0) == 0) return;
  for (int fd = (int)first; fd < 65536; fd++) close(fd); /* kernels before 5.9 */
}

static void mount_step(const struct step *s) {
  const unsigned long hardened = MS_NOSUID | MS_NODEV | MS_NOEXEC;
  struct stat st;
  switch (s->kind) {
    case 'p':
      if (mount("proc", s->path, "proc", hardened, NULL)) init_fail("mount proc on", s->path, errno);
      return;
    case 'r':
      if (lstat(s->path, &st)) return; /* nothing there to protect */
      if (mount(s->path, s->path, NULL, MS_BIND | MS_REC, NULL))
        init_fail("bind", s->path, errno);
      if (mount(NULL, s->path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | hardened, NULL))
        init_fail("remount read-only", s->path, errno);
      return;
    default:
      if (chdir(s->path)) init_fail("chdir", s->path, errno);
      if (syscall(SYS_pivot_root, ".", ".")) init_fail("pivot_root", s->path, errno);
      if (umount2(".", MNT_DETACH)) init_fail("umount old root", s->path, errno);
      if (chdir("/")) init_fail("chdir", "/", errno);
  }
}

/* --- the command ---------------------------------------------------------------------------- */

static int error_fd = -1;

static void command_fail(const char *step, const char *path, int err) {
  char msg[4096];
  const char *kind = strcmp(step, "cwd") == 0 ? "cwd" : "setup";
  int n = snprintf(msg, sizeof msg, "%s%c%s: [Errno %d] %s%s%s%s", kind, '\0', step, err,
                   strerror(err), path ? ": '" : "", path ? path : "", path ? "'" : "");
  if (n > 0) write_all(error_fd, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
  _exit(127);
}

struct spec {
  uint32_t uid, gid, ngroups;
  gid_t *groups;
  const char *cwd;
  char **argv;
  char **env;
};

static char *read_spec(size_t *size) {
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  if (!buf) command_fail("spec", NULL, ENOMEM);
  for (;;) {
    if (n == cap) {
      if (cap >= MAX_SPEC) command_fail("spec", NULL, E2BIG);
      cap *= 2;
      char *bigger = realloc(buf, cap);
      if (!bigger) command_fail("spec", NULL, ENOMEM);
      buf = bigger;
    }
    ssize_t r = read(FD_SPEC, buf + n, cap - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) command_fail("spec", NULL, errno);
    if (r == 0) break;
    n += (size_t)r;
  }
  *size = n;
  return buf;
}

/* The next NUL-terminated string of [*at, end), or NULL if there is none. */
static char *next_string(char **at, char *end) {
  char *s = *at;
  if (s >= end) return NULL;
  char *nul = memchr(s, '\0', (size_t)(end - s));
  if (!nul) return NULL;
  *at = nul + 1;
  return s;
}

static char **string_list(char **at, char *end, uint32_t count) {
  char **list = calloc((size_t)count + 1, sizeof *list);
  if (!list) command_fail("spec", NULL, ENOMEM);
  for (uint32_t i = 0; i < count; i++) {
    list[i] = next_string(at, end);
    if (!list[i]) command_fail("spec", NULL, EINVAL);
  }
  return list;
}

static void parse_spec(char *buf, size_t size, struct spec *spec) {
  uint32_t head[5];
  if (size < 4 + sizeof head || memcmp(buf, "AIS1", 4)) command_fail("spec", NULL, EINVAL);
  memcpy(head, buf + 4, sizeof head);
  spec->uid = head[0];
  spec->gid = head[1];
  spec->ngroups = head[2];
  uint32_t argc = head[3], envc = head[4];
  size_t off = 4 + sizeof head;
  if (spec->ngroups > 65536 || argc == 0 || argc > size || envc > size ||
      (size - off) / sizeof(uint32_t) < spec->ngroups)
    command_fail("spec", NULL, EINVAL);
  spec->groups = calloc(spec->ngroups + 1, sizeof(gid_t));
  if (!spec->groups) command_fail("spec", NULL, ENOMEM);
  /* (uid_t)-1 asks setresuid/setresgid to leave an id as it is (root's): never a caller's. */
  if (spec->uid == UINT32_MAX || spec->gid == UINT32_MAX) command_fail("spec", NULL, EINVAL);
  for (uint32_t i = 0; i < spec->ngroups; i++) {
    uint32_t g;
    memcpy(&g, buf + off + 4 * (size_t)i, 4);
    if (g == UINT32_MAX) command_fail("spec", NULL, EINVAL);
    spec->groups[i] = g;
  }
  char *at = buf + off + 4 * (size_t)spec->ngroups, *end = buf + size;
  spec->cwd = next_string(&at, end);
  if (!spec->cwd) command_fail("spec", NULL, EINVAL);
  spec->argv = string_list(&at, end, argc);
  spec->env = string_list(&at, end, envc);
  if (at != end) command_fail("spec", NULL, EINVAL); /* trailing bytes: not our writer's */
}

static void shed_bounding_set(int last_cap) {
  for (int cap = 0; cap <= last_cap; cap++) {
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
      command_fail("capabilities", NULL, errno);
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    command_fail("capabilities", NULL, errno);
  if (prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, 0, 0, 0))
    command_fail("capabilities", NULL, errno);
}

static void become(const struct spec *spec) {
  if (setgroups(spec->ngroups, spec->groups)) command_fail("uid", NULL, errno);
  if (setresgid(spec->gid, spec->gid, spec->gid)) command_fail("uid", NULL, errno);
  if (setresuid(spec->uid, spec->uid, spec->uid)) command_fail("uid", NULL, errno);
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  memset(data, 0, sizeof data);
  if (syscall(SYS_capset, &header, data)) command_fail("uid", NULL, errno);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) command_fail("uid", NULL, errno);
}

static long set_filter(const struct bpf *prog, unsigned long flags) {
  struct sock_fprog fprog = {prog->len, prog->insns};
  return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &fprog);
}

/* The tracer's filter, its listener handed to the supervisor over fd 4 and closed here: nothing
 * in the sandbox can answer its own notifications. The exec that follows waits for the answer. */
static void install_tracer(const struct bpf *notify) {
  long listener = set_filter(notify, SECCOMP_FILTER_FLAG_NEW_LISTENER |
                                         SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV);
  if (listener < 0 && errno == EINVAL) /* WAIT_KILLABLE_RECV is Linux 5.19+ */
    listener = set_filter(notify, SECCOMP_FILTER_FLAG_NEW_LISTENER);
  if (listener < 0) command_fail("trace", NULL, errno);
  char tag = 'L';
  struct iovec iov = {&tag, 1};
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof control.buf;
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  int fd = (int)listener;
  memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
  ssize_t sent;
  do sent = sendmsg(4, &msg, MSG_NOSIGNAL);
  while (sent < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  close(4);
  if (sent != 1) command_fail("trace", NULL, sent < 0 ? err : EPIPE);
}

static void command(const struct config *cfg, int error_w) {
  error_fd = error_w;
  for (int i = 0; i < cfg->nprocs; i++) {
    /* Writing "0" moves the writer itself: limited from here on, before any request exists. */
    if (write(FD_PROCS + i, "0", 1) != 1) command_fail("cgroup", NULL, errno);
  }
  if (setsid() < 0) command_fail("stdio", NULL, errno);
  int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(FD_OUT, 1) < 0 || dup2(FD_ERR, 2) < 0 ||
      dup3(error_w, 3, O_CLOEXEC) < 0)
    command_fail("stdio", NULL, errno);
  error_fd = 3;
  shed_bounding_set(cfg->last_cap);
  size_t size;
  char *buf = read_spec(&size);
  struct spec spec;
  parse_spec(buf, size, &spec);
  unsigned int keep = 4;
  if (cfg->trace) {
    if (dup3(FD_TRACE, 4, O_CLOEXEC) < 0) command_fail("trace", NULL, errno);
    keep = 5;
  }
  close_from(keep); /* every fd but stdio, the error pipe and the channel */
  become(&spec);
  if (chdir(spec.cwd)) command_fail("cwd", spec.cwd, errno);
  if (cfg->deny.len && set_filter(&cfg->deny, 0)) command_fail("seccomp", NULL, errno);
  if (cfg->trace) install_tracer(&cfg->notify);
  execve(spec.argv[0], spec.argv, spec.env);
  command_fail("exec", spec.argv[0], errno);
}

int main(int argc, char **argv) {
  default_signals();
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)) init_fail("prctl", "PR_SET_PDEATHSIG", errno);
  struct config cfg;
  parse_args(argc, argv, &cfg);
  /* Only what the supervisor gave: stdio (/dev/null), 10..14 and the cgroup.procs fds. */
  if (syscall(SYS_close_range, 3, FD_SPEC - 1, 0)) {
    for (int fd = 3; fd < FD_SPEC; fd++) close(fd);
  }
  if (!cfg.trace) close(FD_TRACE);
  close_from(FD_PROCS + (unsigned int)cfg.nprocs);
  if (unshare(CLONE_NEWNS)) init_fail("unshare", "CLONE_NEWNS", errno);
  for (int i = 0; i < cfg.nsteps; i++) mount_step(&cfg.steps[i]);
  write_all(FD_STATUS, "R", 1); /* set up: the supervisor may now hold our namespaces */

  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC)) init_fail("pipe", NULL, errno);
  int error_r = fcntl(pipe_fds[0], F_DUPFD_CLOEXEC, 64);
  int error_w = fcntl(pipe_fds[1], F_DUPFD_CLOEXEC, 64);
  if (error_r < 0 || error_w < 0) init_fail("pipe", NULL, errno);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  pid_t child = fork();
  if (child < 0) init_fail("fork", NULL, errno);
  if (child == 0) {
    close(error_r);
    command(&cfg, error_w);
  }
  close(error_w);
  close(FD_SPEC);
  close(FD_OUT);
  close(FD_ERR);
  if (cfg.trace) close(FD_TRACE); /* only the command may hand the listener over */
  for (int i = 0; i < cfg.nprocs; i++) close(FD_PROCS + i);

  char failure[4096];
  size_t got = 0;
  for (;;) { /* empty once the exec succeeded (close-on-exec) */
    ssize_t r = read(error_r, failure + got, sizeof failure - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += (size_t)r;
    if (got == sizeof failure) break;
  }
  close(error_r);
  int status = 0;
  for (;;) { /* reaps orphans too, as a pid 1 must */
    pid_t pid = wait(&status);
    if (pid == child) break;
    if (pid < 0 && errno != EINTR) init_fail("wait", NULL, errno);
  }
  if (got) {
    char report[1 + sizeof failure];
    report[0] = 'E';
    memcpy(report + 1, failure, got);
    write_all(FD_STATUS, report, got + 1);
  } else {
    char report[1 + sizeof status + 1];
    report[0] = 'S';
    memcpy(report + 1, &status, sizeof status);
    report[1 + sizeof status] = (char)left_running(cfg.grace_ms);
    write_all(FD_STATUS, report, sizeof report);
  }
  _exit(0); /* pid 1 exits: the kernel kills every process left in the namespace */
}
