/*
 * vmsnap-agent: the workload that runs inside the vmsnap test guest.
 *
 * It gives the host three ways to tell whether a VM snapshot was taken
 * and restored correctly:
 *
 *  - a ticker whose count shows how much the guest really ran (a stalled
 *    guest drops ticks instead of catching up afterwards),
 *  - a memory dirtier that keeps RAM changing at a chosen rate, and
 *  - a writer that stamps numbered, checksummed records onto one or more
 *    disks, always in the same order, and keeps in RAM which record was
 *    last completed.  Disk contents and that RAM "ledger" must agree in
 *    any consistent snapshot, and records must never be torn or missing.
 *
 * The host talks to it over a serial line, one command or event a line.
 *
 *   vmsnap-agent run --target PATH [--target PATH...] [--mem-mib N]
 *                    [--dirty-mibs R] [--write-interval-ms MS]
 *                    --channel /dev/ttyS1
 *   vmsnap-agent check --target PATH [--target PATH...] [--channel DEV]
 *   vmsnap-agent prepare PATH...
 *
 * Events sent: READY, TICK <count> <guest_monotonic_ms>, SEQ <n>,
 * ERROR <text>.  Commands: PING -> PONG; MARK <label> ->
 * MARK <label> <ticks> <last_complete>; CHECK -> CHECK OK <max_seq> or
 * CHECK FAIL <reason>; STATS -> STATS <ticks> <last_complete> <in_flight>
 * <dirtied_pages>.
 *
 * Build: gcc -static -O2 -pthread -o vmsnap-agent vmsnap-agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

/*
 * On-disk layout of a target: NSLOTS records of REC_SIZE bytes starting
 * at REGION_OFFSET.  Record seq lives in slot seq % NSLOTS, so a target
 * always holds the last NSLOTS records it got.  The first MiB is left
 * alone so that a target can be a whole disk with a partition table or
 * filesystem signature in front without either clobbering the other.
 */
#define MAGIC           "VMSNAPR1"
#define REC_SIZE        4096
#define NSLOTS          256
#define REGION_OFFSET   (1024 * 1024)
#define REGION_SIZE     (NSLOTS * REC_SIZE)
#define TARGET_SIZE     (REGION_OFFSET + REGION_SIZE)
#define MAX_TARGETS     16

#define TICK_NS         (10 * 1000 * 1000)  /* ticker period */
#define TICKS_PER_LINE  10                  /* TICK line every 100 ms */
#define SEQ_LINE_EVERY  100
#define PAGE            4096

/* Little-endian like the guest, so the host can parse it directly. */
struct record {
    char magic[8];
    uint32_t target;            /* index of the target it was written to */
    uint32_t reserved;
    uint64_t seq;
    uint64_t ticks;             /* ticker count when it was built */
    uint64_t mono_ns;           /* guest CLOCK_MONOTONIC when built */
    uint8_t payload[REC_SIZE - 44];  /* derived from seq, see fill_payload */
    uint32_t crc;               /* zlib crc32 of all bytes before it */
};
_Static_assert(sizeof(struct record) == REC_SIZE, "record size");

static int ntargets;
static const char *target_path[MAX_TARGETS];
static int target_fd[MAX_TARGETS];

static int chan_fd = -1;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static atomic_uint_fast64_t ticks;
static atomic_uint_fast64_t dirtied_pages;

/*
 * The RAM ledger.  in_flight is the record being written (equal to
 * last_complete while the writer is between records).  Both, and the
 * writer's pause handshake, are protected by ledger_lock.
 */
static pthread_mutex_t ledger_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ledger_cond;
static uint64_t last_complete, in_flight;
static bool pause_req, writer_idle;
static char writer_error[256];

static unsigned write_interval_ms = 10;
static unsigned mem_mib, dirty_mibs;

/* ---- helpers ---------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void ns_to_ts(uint64_t ns, struct timespec *ts)
{
    ts->tv_sec = ns / 1000000000ull;
    ts->tv_nsec = ns % 1000000000ull;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            return;     /* nobody to tell; the host will time out */
        }
        buf += n;
        len -= n;
    }
}

/*
 * Send one line to the host.  Lines come from several threads and must
 * not interleave, hence the lock around a single buffer.  Everything but
 * the chatty TICK/SEQ lines is copied to stderr, i.e. the console log.
 */
static void __attribute__((format(printf, 2, 3)))
emit(bool to_console, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if (n > (int)sizeof(buf) - 2) {
        n = sizeof(buf) - 2;
    }
    buf[n++] = '\n';
    pthread_mutex_lock(&out_lock);
    if (chan_fd >= 0) {
        write_all(chan_fd, buf, n);
    }
    if (to_console || chan_fd < 0) {
        fprintf(stderr, "vmsnap-agent: %.*s", n, buf);
    }
    pthread_mutex_unlock(&out_lock);
}

static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[i] = c;
    }
}

/* Same polynomial and conditioning as zlib.crc32() on the host. */
static uint32_t crc32(const void *data, size_t len)
{
    const uint8_t *p = data;
    uint32_t c = 0xffffffffu;

    while (len--) {
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    }
    return c ^ 0xffffffffu;
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/*
 * Payload is a pure function of seq, so the checker can tell a record
 * whose header and body come from different writes even if someone
 * recomputed the crc.
 */
static void fill_payload(uint8_t *p, size_t len, uint64_t seq)
{
    uint64_t s = seq * 0x9e3779b97f4a7c15ull + 1;

    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = xorshift64(&s);
        memcpy(p + i, &v, len - i < 8 ? len - i : 8);
    }
}

static void build_record(struct record *r, int target, uint64_t seq)
{
    memset(r, 0, sizeof(*r));
    memcpy(r->magic, MAGIC, 8);
    r->target = target;
    r->seq = seq;
    r->ticks = atomic_load(&ticks);
    r->mono_ns = now_ns();
    fill_payload(r->payload, sizeof(r->payload), seq);
    r->crc = crc32(r, offsetof(struct record, crc));
}

static int write_record(int t, uint64_t seq, struct record *buf)
{
    off_t off = REGION_OFFSET + (off_t)(seq % NSLOTS) * REC_SIZE;
    ssize_t n;

    build_record(buf, t, seq);
    n = pwrite(target_fd[t], buf, REC_SIZE, off);
    if (n != REC_SIZE) {
        snprintf(writer_error, sizeof(writer_error),
                 "target %d (%s): writing seq %" PRIu64 ": %s", t,
                 target_path[t], seq, n < 0 ? strerror(errno) : "short write");
        return -1;
    }
    if (fdatasync(target_fd[t]) < 0) {
        snprintf(writer_error, sizeof(writer_error),
                 "target %d (%s): fdatasync after seq %" PRIu64 ": %s", t,
                 target_path[t], seq, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- checking --------------------------------------------------------- */

static bool all_zero(const uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/*
 * Read target t's slot region straight from the device (O_DIRECT, so no
 * page cache can paper over what is really there) and check each slot
 * and that the valid records are exactly the last NSLOTS seqs up to the
 * highest one.  On success *max is that highest seq, 0 for a blank disk.
 */
static bool scan_target(int t, int fd, uint64_t *max, char *why, size_t len)
{
    static struct record *buf;
    static uint8_t payload[sizeof(buf->payload)];
    uint64_t seen[NSLOTS] = { 0 };
    uint64_t hi = 0;
    const char *p = target_path[t];
    ssize_t n;

    if (!buf && posix_memalign((void **)&buf, PAGE, REGION_SIZE)) {
        snprintf(why, len, "out of memory");
        return false;
    }
    n = pread(fd, buf, REGION_SIZE, REGION_OFFSET);
    if (n != REGION_SIZE) {
        snprintf(why, len, "target %d (%s): reading records: %s", t, p,
                 n < 0 ? strerror(errno) : "short read");
        return false;
    }
    for (int i = 0; i < NSLOTS; i++) {
        struct record *r = &buf[i];

        if (all_zero((uint8_t *)r, REC_SIZE)) {
            continue;
        }
        if (memcmp(r->magic, MAGIC, 8)) {
            snprintf(why, len, "target %d (%s) slot %d: bad magic "
                     "(corrupt record)", t, p, i);
            return false;
        }
        if (crc32(r, offsetof(struct record, crc)) != r->crc) {
            snprintf(why, len, "target %d (%s) slot %d: bad crc (torn or "
                     "corrupt record, header says seq %" PRIu64 ")", t, p, i,
                     r->seq);
            return false;
        }
        if (r->target != (uint32_t)t) {
            snprintf(why, len, "target %d (%s) slot %d: seq %" PRIu64
                     " was written for target %" PRIu32, t, p, i, r->seq,
                     r->target);
            return false;
        }
        if (r->seq == 0 || r->seq % NSLOTS != (uint64_t)i) {
            snprintf(why, len, "target %d (%s) slot %d: holds seq %" PRIu64
                     " which belongs in slot %" PRIu64, t, p, i, r->seq,
                     r->seq % NSLOTS);
            return false;
        }
        fill_payload(payload, sizeof(payload), r->seq);
        if (memcmp(payload, r->payload, sizeof(payload))) {
            snprintf(why, len, "target %d (%s) slot %d: seq %" PRIu64
                     " has the wrong payload", t, p, i, r->seq);
            return false;
        }
        seen[i] = r->seq;
        if (r->seq > hi) {
            hi = r->seq;
        }
    }
    /* Every slot with seq <= hi was written; its record must be current. */
    for (uint64_t s = hi; s > 0 && s + NSLOTS > hi; s--) {
        uint64_t got = seen[s % NSLOTS];
        if (got != s) {
            char holds[48];
            if (got) {
                snprintf(holds, sizeof(holds), "holds seq %" PRIu64, got);
            } else {
                snprintf(holds, sizeof(holds), "is empty");
            }
            snprintf(why, len, "target %d (%s): seq %" PRIu64 " is missing "
                     "(lost write; newest is %" PRIu64 ", slot %" PRIu64
                     " %s)", t, p, s, hi, s % NSLOTS, holds);
            return false;
        }
    }
    *max = hi;
    return true;
}

/*
 * The full consistency check.  Without a ledger (fresh boot from copied
 * disks) only the disks are compared to each other; with one, the disks
 * must also agree with RAM: every target's newest seq must lie in
 * [last_complete, in_flight].  That allows the one record in flight to
 * be on some targets and not others, and also all of them holding it
 * while RAM has not yet noted it complete, but nothing else.
 * On success *max is the newest seq on any target (that of target 0).
 */
static bool check_all(const int *fds, bool ledger, uint64_t lc, uint64_t fl,
                      uint64_t *max, char *why, size_t len)
{
    uint64_t m[MAX_TARGETS] = { 0 };
    int last = ntargets - 1;

    for (int t = 0; t < ntargets; t++) {
        if (!scan_target(t, fds[t], &m[t], why, len)) {
            return false;
        }
    }
    /* Written in order, so each target is at most its predecessor... */
    for (int t = 1; t < ntargets; t++) {
        if (m[t] > m[t - 1]) {
            snprintf(why, len, "disks disagree: target %d (%s) has seq %"
                     PRIu64 " but target %d (%s), written first, only %"
                     PRIu64, t, target_path[t], m[t], t - 1,
                     target_path[t - 1], m[t - 1]);
            return false;
        }
    }
    /* ...and only the one record in flight may be missing at the end. */
    if (ntargets > 1 && m[last] + 1 < m[0]) {
        snprintf(why, len, "disks disagree: target 0 (%s) has seq %" PRIu64
                 " but target %d (%s) only %" PRIu64, target_path[0], m[0],
                 last, target_path[last], m[last]);
        return false;
    }
    if (ledger) {
        for (int t = 0; t < ntargets; t++) {
            if (m[t] < lc) {
                snprintf(why, len, "disk/RAM mismatch: target %d (%s) "
                         "newest seq %" PRIu64 " but RAM says seq %" PRIu64
                         " was complete (disk older than RAM)", t,
                         target_path[t], m[t], lc);
                return false;
            }
            if (m[t] > fl) {
                snprintf(why, len, "disk/RAM mismatch: target %d (%s) has "
                         "seq %" PRIu64 " but RAM never wrote past seq %"
                         PRIu64 " (disk newer than RAM)", t, target_path[t],
                         m[t], fl);
                return false;
            }
        }
    }
    *max = m[0];
    return true;
}

/* ---- threads ---------------------------------------------------------- */

/*
 * Ticks every 10 ms.  When the guest is held up for longer than a tick,
 * the missed ticks are dropped rather than made up, so the count shows
 * how long the guest actually ran, which is what the host measures.
 */
static void *ticker(void *arg)
{
    uint64_t next = now_ns() + TICK_NS;

    (void)arg;
    for (;;) {
        struct timespec ts;
        uint64_t n, now;

        ns_to_ts(next, &ts);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)) {
            /* EINTR only */
        }
        n = atomic_fetch_add(&ticks, 1) + 1;
        now = now_ns();
        if (n % TICKS_PER_LINE == 0) {
            emit(false, "TICK %" PRIu64 " %" PRIu64, n, now / 1000000);
        }
        next += TICK_NS;
        if (now > next) {
            next = now + TICK_NS;
        }
    }
    return NULL;
}

/*
 * Keeps mem_mib MiB of anonymous memory changing at dirty_mibs MiB/s,
 * whole random pages at a time, every 10 ms.  The contents are never
 * zero and change every time, so neither zero-page detection nor
 * compression of repeated pages can make the work disappear.
 */
static void *dirtier(void *arg)
{
    size_t npages = (size_t)mem_mib * 256;
    double per_ns = dirty_mibs * 256.0 / 1e9, budget = 0;
    uint64_t rng = now_ns() | 1, gen = 1, last;
    uint64_t *mem;

    (void)arg;
    mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        emit(true, "ERROR dirtier: cannot map %u MiB: %s", mem_mib,
             strerror(errno));
        return NULL;
    }
    for (size_t i = 0; i < npages * PAGE / 8; i++) {
        mem[i] = i ^ 0x5555555555555555ull;
    }
    last = now_ns();
    while (dirty_mibs) {
        struct timespec ts = { 0, TICK_NS };
        uint64_t now;

        nanosleep(&ts, NULL);
        now = now_ns();
        budget += (now - last) * per_ns;
        last = now;
        /* After a stall, go on at the set rate rather than in a burst. */
        if (budget > dirty_mibs * 256.0 / 50) {
            budget = dirty_mibs * 256.0 / 50;
        }
        for (; budget >= 1; budget -= 1) {
            uint64_t *pg = mem + (xorshift64(&rng) % npages) * (PAGE / 8);
            uint64_t v = ++gen * 0x9e3779b97f4a7c15ull;
            for (int k = 0; k < PAGE / 8; k++) {
                pg[k] = v + k;
            }
            atomic_fetch_add(&dirtied_pages, 1);
        }
    }
    return NULL;
}

static void *writer(void *arg)
{
    struct record *buf;
    uint64_t seq;

    (void)arg;
    if (posix_memalign((void **)&buf, PAGE, REC_SIZE)) {
        abort();
    }
    for (;;) {
        pthread_mutex_lock(&ledger_lock);
        while (pause_req || writer_error[0]) {
            writer_idle = true;
            pthread_cond_broadcast(&ledger_cond);
            pthread_cond_wait(&ledger_cond, &ledger_lock);
        }
        writer_idle = false;
        seq = in_flight = last_complete + 1;
        pthread_mutex_unlock(&ledger_lock);

        for (int t = 0; t < ntargets; t++) {
            if (write_record(t, seq, buf) < 0) {
                emit(true, "ERROR %s", writer_error);
                break;  /* the loop above parks us for good */
            }
        }
        if (writer_error[0]) {
            continue;
        }

        pthread_mutex_lock(&ledger_lock);
        last_complete = seq;
        if (seq % SEQ_LINE_EVERY == 0) {
            emit(false, "SEQ %" PRIu64, seq);
        }
        /* The pause between records; a CHECK cuts it short. */
        if (write_interval_ms && !pause_req) {
            struct timespec ts;
            ns_to_ts(now_ns() + write_interval_ms * 1000000ull, &ts);
            while (!pause_req &&
                   pthread_cond_timedwait(&ledger_cond, &ledger_lock,
                                          &ts) != ETIMEDOUT) {
                /* spurious wakeup or somebody else's broadcast */
            }
        }
        pthread_mutex_unlock(&ledger_lock);
    }
    return NULL;
}

/* ---- commands --------------------------------------------------------- */

static void do_check(void)
{
    char why[512];
    uint64_t max, lc, fl;
    bool ok;

    /* Park the writer between records so RAM and disks hold still. */
    pthread_mutex_lock(&ledger_lock);
    pause_req = true;
    pthread_cond_broadcast(&ledger_cond);
    while (!writer_idle) {
        pthread_cond_wait(&ledger_cond, &ledger_lock);
    }
    lc = last_complete;
    fl = in_flight;
    pthread_mutex_unlock(&ledger_lock);

    if (writer_error[0]) {
        snprintf(why, sizeof(why), "writer stopped: %s", writer_error);
        ok = false;
    } else {
        ok = check_all(target_fd, true, lc, fl, &max, why, sizeof(why));
    }
    if (ok) {
        emit(true, "CHECK OK %" PRIu64, max);
    } else {
        emit(true, "CHECK FAIL %s", why);
    }

    pthread_mutex_lock(&ledger_lock);
    pause_req = false;
    pthread_cond_broadcast(&ledger_cond);
    pthread_mutex_unlock(&ledger_lock);
}

static void handle_line(char *line)
{
    size_t n = strlen(line);

    if (n && line[n - 1] == '\r') {
        line[--n] = 0;
    }
    if (!n) {
        return;
    }
    if (!strcmp(line, "PING")) {
        emit(false, "PONG");
    } else if (!strncmp(line, "MARK ", 5)) {
        uint64_t lc;
        pthread_mutex_lock(&ledger_lock);
        lc = last_complete;
        pthread_mutex_unlock(&ledger_lock);
        emit(false, "MARK %s %" PRIu64 " %" PRIu64, line + 5,
             (uint64_t)atomic_load(&ticks), lc);
    } else if (!strcmp(line, "CHECK")) {
        do_check();
    } else if (!strcmp(line, "STATS")) {
        uint64_t lc, fl;
        pthread_mutex_lock(&ledger_lock);
        lc = last_complete;
        fl = in_flight;
        pthread_mutex_unlock(&ledger_lock);
        emit(false, "STATS %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64,
             (uint64_t)atomic_load(&ticks), lc, fl,
             (uint64_t)atomic_load(&dirtied_pages));
    } else {
        emit(true, "ERROR unknown command: %.100s", line);
    }
}

static void command_loop(void)
{
    char line[512];
    size_t len = 0;
    bool overlong = false;

    for (;;) {
        char c;
        ssize_t n = read(chan_fd, &c, 1);

        if (n <= 0) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            /* Nothing useful to do but wait for the line to come back. */
            usleep(100 * 1000);
            continue;
        }
        if (c != '\n') {
            if (len < sizeof(line) - 1) {
                line[len++] = c;
            } else {
                overlong = true;
            }
            continue;
        }
        line[len] = 0;
        if (overlong) {
            emit(true, "ERROR command too long");
        } else {
            handle_line(line);
        }
        len = 0;
        overlong = false;
    }
}

/* ---- setup ------------------------------------------------------------ */

static void open_channel(const char *path)
{
    struct termios tio;

    chan_fd = open(path, O_RDWR | O_NOCTTY);
    if (chan_fd < 0) {
        fprintf(stderr, "vmsnap-agent: cannot open %s: %s\n", path,
                strerror(errno));
        exit(2);
    }
    /* Raw, so that bytes pass both ways untouched; not a tty is fine too. */
    if (tcgetattr(chan_fd, &tio) == 0) {
        cfmakeraw(&tio);
        tio.c_cflag |= CLOCAL | CREAD;   /* no modem lines on a VM serial */
        cfsetspeed(&tio, B115200);
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        tcsetattr(chan_fd, TCSANOW, &tio);
        tcflush(chan_fd, TCIFLUSH);
    }
}

static uint64_t target_size(int fd)
{
    struct stat st;
    uint64_t size;

    if (fstat(fd, &st) < 0) {
        return 0;
    }
    if (S_ISBLK(st.st_mode)) {
        return ioctl(fd, BLKGETSIZE64, &size) < 0 ? 0 : size;
    }
    return st.st_size;
}

/* Failures are reported with prefix, so that check mode still answers. */
static void open_targets(int flags, const char *prefix)
{
    for (int t = 0; t < ntargets; t++) {
        uint64_t size;

        target_fd[t] = open(target_path[t], flags | O_DIRECT | O_CLOEXEC);
        if (target_fd[t] < 0) {
            emit(true, "%s cannot open target %d (%s): %s", prefix, t,
                 target_path[t], strerror(errno));
            exit(2);
        }
        size = target_size(target_fd[t]);
        if (size < TARGET_SIZE) {
            emit(true, "%s target %d (%s) has %" PRIu64 " bytes, needs %d",
                 prefix, t, target_path[t], size, TARGET_SIZE);
            exit(2);
        }
    }
}

/*
 * Create a file target filled with real zeros (not a sparse or merely
 * fallocated file): later O_DIRECT writes then overwrite allocated,
 * initialised blocks and never need a metadata update to be durable.
 */
static int prepare_file(const char *path)
{
    static char zeros[64 * 1024];
    struct stat st;
    char dir[4096];
    int fd;

    if (stat(path, &st) == 0) {
        if (!S_ISREG(st.st_mode) || st.st_size >= TARGET_SIZE) {
            return 0;
        }
        fprintf(stderr, "vmsnap-agent: %s exists but is too small\n", path);
        return -1;
    }
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0) {
        fprintf(stderr, "vmsnap-agent: creating %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    for (off_t off = 0; off < TARGET_SIZE; off += sizeof(zeros)) {
        if (write(fd, zeros, sizeof(zeros)) != sizeof(zeros)) {
            fprintf(stderr, "vmsnap-agent: writing %s: %s\n", path,
                    strerror(errno));
            close(fd);
            return -1;
        }
    }
    if (fsync(fd) < 0) {
        fprintf(stderr, "vmsnap-agent: fsync %s: %s\n", path, strerror(errno));
        close(fd);
        return -1;
    }
    close(fd);
    /* The new directory entry must be durable too. */
    snprintf(dir, sizeof(dir), "%s", path);
    fd = open(dirname(dir), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    fprintf(stderr, "vmsnap-agent: created %s (%d bytes)\n", path,
            TARGET_SIZE);
    return 0;
}

/*
 * Pick up where a previous run on these disks stopped (a boot from a
 * copied image, say).  If it stopped with a record on only the first
 * targets, finish that record first so the writer starts from a state
 * where all targets agree, as CHECK expects between records.
 */
static void resume_from_disks(void)
{
    char why[512];
    struct record *buf;
    uint64_t max;

    if (!check_all(target_fd, false, 0, 0, &max, why, sizeof(why))) {
        emit(true, "ERROR disks are inconsistent at start: %s", why);
        exit(3);
    }
    if (max == 0) {
        return;
    }
    if (posix_memalign((void **)&buf, PAGE, REC_SIZE)) {
        abort();
    }
    for (int t = 0; t < ntargets; t++) {
        if (write_record(t, max, buf) < 0) {
            emit(true, "ERROR %s", writer_error);
            exit(3);
        }
    }
    free(buf);
    last_complete = in_flight = max;
    fprintf(stderr, "vmsnap-agent: disks already hold seq %" PRIu64
            ", continuing from there\n", max);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vmsnap-agent run --target PATH... [--mem-mib N] "
            "[--dirty-mibs R]\n"
            "                        [--write-interval-ms MS] --channel DEV\n"
            "       vmsnap-agent check --target PATH... [--channel DEV]\n"
            "       vmsnap-agent prepare FILE...\n");
    exit(2);
}

static unsigned parse_uint(const char *s, const char *what)
{
    char *end;
    unsigned long v = strtoul(s, &end, 10);

    if (!*s || *end || v > 1000000) {
        fprintf(stderr, "vmsnap-agent: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "target", required_argument, NULL, 't' },
        { "mem-mib", required_argument, NULL, 'm' },
        { "dirty-mibs", required_argument, NULL, 'd' },
        { "write-interval-ms", required_argument, NULL, 'i' },
        { "channel", required_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    const char *cmd, *channel = NULL;
    pthread_condattr_t ca;
    pthread_t th;
    int c;

    if (argc < 2) {
        usage();
    }
    cmd = argv[1];
    crc32_init();
    setvbuf(stderr, NULL, _IOLBF, 0);

    if (!strcmp(cmd, "prepare")) {
        int rc = 0;
        for (int i = 2; i < argc; i++) {
            rc |= prepare_file(argv[i]) ? 1 : 0;
        }
        return rc;
    }
    if (strcmp(cmd, "run") && strcmp(cmd, "check")) {
        usage();
    }
    optind = 2;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (ntargets == MAX_TARGETS) {
                fprintf(stderr, "vmsnap-agent: at most %d targets\n",
                        MAX_TARGETS);
                exit(2);
            }
            target_path[ntargets++] = optarg;
            break;
        case 'm':
            mem_mib = parse_uint(optarg, "--mem-mib");
            break;
        case 'd':
            dirty_mibs = parse_uint(optarg, "--dirty-mibs");
            break;
        case 'i':
            write_interval_ms = parse_uint(optarg, "--write-interval-ms");
            break;
        case 'c':
            channel = optarg;
            break;
        default:
            usage();
        }
    }
    if (optind != argc) {
        usage();
    }
    if (channel) {
        open_channel(channel);
    } else if (!strcmp(cmd, "run")) {
        usage();
    }

    if (!strcmp(cmd, "check")) {
        char why[512];
        uint64_t max;

        open_targets(O_RDONLY, "CHECK FAIL");
        if (check_all(target_fd, false, 0, 0, &max, why, sizeof(why))) {
            emit(true, "CHECK OK %" PRIu64, max);
            return 0;
        }
        emit(true, "CHECK FAIL %s", why);
        return 1;
    }

    /* The writer's interval sleep must not jump with the wall clock. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ledger_cond, &ca);

    open_targets(O_RDWR, "ERROR");
    resume_from_disks();

    fprintf(stderr, "vmsnap-agent: %d target(s), %u MiB dirtied at %u MiB/s, "
            "%u ms between records\n", ntargets, mem_mib, dirty_mibs,
            write_interval_ms);
    pthread_create(&th, NULL, ticker, NULL);
    if (mem_mib) {
        pthread_create(&th, NULL, dirtier, NULL);
    }
    if (ntargets) {
        pthread_create(&th, NULL, writer, NULL);
    } else {
        writer_idle = true;     /* CHECK must not wait for it */
    }
    emit(true, "READY");
    command_loop();
    return 0;
}
