/*
 * ferry guest workload: fills a memory region with deterministic page contents,
 * dirties it at a steady rate, and answers commands on the serial console.
 *
 * Build: gcc -static -O2 -o workload workload.c
 *
 * Parameters (kernel command line, /proc/cmdline):
 *   ferry.mem_mib=N        region size in MiB (default 256)
 *   ferry.dirty_mibps=R    dirty rate in MiB/s, float (default 0)
 *   ferry.mix=M            realistic|zero|text|random (default realistic)
 *   ferry.seed=S           content seed (default 1)
 *   ferry.disk=DEV         block device to write to (e.g. /dev/vda; default none)
 *   ferry.disk_mib=N       first N MiB of DEV are used (default 64)
 *   ferry.disk_wps=W       4 KiB block writes per second to DEV (default 0)
 * For testing on a host, FERRY_CMDLINE in the environment replaces /proc/cmdline.
 *
 * Every 4 KiB page holds content that is a pure function of
 * (seed, page index, generation[page]); the page type (zero/text/random) is a
 * function of (seed, page index) only.  Dirtying picks a page at random,
 * increments its generation and rewrites it.
 *
 * Console protocol (one command per line in, one reply line out):
 *   check       -> FERRY-CHECK ok pages=<n> writes=<w> [disk_blocks=<b> disk_writes=<dw>]
 *                  FERRY-CHECK fail bad=<count> first=<page index> [disk_bad=<k> disk_first=<block>]
 *                  With a disk, check also reads back (O_DIRECT, past the page cache)
 *                  every block this workload wrote and compares it with what it wrote:
 *                  the table of block generations lives in guest RAM, so a check after a
 *                  migration proves that no acknowledged disk write was lost.
 *   digest      -> FERRY-DIGEST <16 hex digits>   (FNV-1a 64 over the region's bytes)
 *   rate <R>    -> FERRY-RATE <R>                 (FERRY-ERR bad rate if R is invalid)
 *   pause       -> FERRY-PAUSED
 *   resume      -> FERRY-RESUMED
 *   ping        -> FERRY-PONG writes=<w>
 *   other       -> FERRY-ERR unknown command      (empty lines are ignored)
 * Unsolicited lines:
 *   FERRY-READY pages=<n> mix=<mix> rate=<R>      once, after the initial fill
 *   FERRY-HB t=<whole seconds since ready> writes=<w>   every second
 * <w> counts page writes made by dirtying since READY (the initial fill is not
 * counted).
 *
 * Host-side helper (not used in the guest):
 *   workload --dump <mib> <mix> <seed>   writes the freshly filled region
 *                                        (all generations 0) to stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define SLOT 16 /* dictionary slot size: words are copied as 16-byte blocks */

enum page_type { T_ZERO, T_TEXT, T_RANDOM };
enum mix { MIX_REALISTIC, MIX_ZERO, MIX_TEXT, MIX_RANDOM };
static const char *const mix_names[] = {"realistic", "zero", "text", "random"};

/* ------------------------------------------------------------------ */
/* Parameters and state                                                */

static unsigned long cfg_mem_mib = 256;
static double cfg_rate = 0.0; /* MiB/s */
static int cfg_mix = MIX_REALISTIC;
static uint64_t cfg_seed = 1;

static uint8_t *region;
static uint32_t *generation;
static uint8_t *ptype;
static uint64_t npages;
static uint64_t total_writes;

/* Disk writer: block i (4 KiB) holds a function of (seed, i, disk_gen[i]); generation 0
 * means "never written by us" and is not checked. */
static char cfg_disk[64];
static unsigned long cfg_disk_mib = 64;
static double cfg_disk_wps = 0.0;
static int disk_fd = -1;
static uint32_t *disk_gen;
static uint64_t disk_blocks;
static uint64_t disk_writes;
static uint64_t disk_written_blocks; /* blocks with generation > 0 */
static uint8_t *disk_buf;             /* O_DIRECT needs aligned buffers */
static uint8_t *disk_rbuf;
static int paused;
static double now_s(void);
static double disk_t0;
static uint64_t disk_due;
static uint64_t disk_pick;

/* ------------------------------------------------------------------ */
/* Hashing and PRNGs                                                   */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* State for the content of (page, generation); never zero. */
static inline uint64_t page_state(uint64_t idx, uint32_t gen)
{
    uint64_t s = mix64(cfg_seed * 0x9e3779b97f4a7c15ULL + (idx + 1) * 0xd1b54a32d192ed03ULL);
    s = mix64(s ^ ((uint64_t)gen * 0xa24baed4963ee407ULL + 0x632be59bd9b4e019ULL));
    return s ? s : 0x2545f4914f6cdd1dULL;
}

static int page_type_of(uint64_t idx)
{
    switch (cfg_mix) {
    case MIX_ZERO: return T_ZERO;
    case MIX_TEXT: return T_TEXT;
    case MIX_RANDOM: return T_RANDOM;
    default: break;
    }
    uint64_t h = mix64((cfg_seed ^ 0x5851f42d4c957f2dULL) * 0x9e3779b97f4a7c15ULL + idx);
    uint64_t pct = ((h >> 32) * 100) >> 32; /* 0..99 */
    if (pct < 30) return T_ZERO;
    if (pct < 75) return T_TEXT;
    return T_RANDOM;
}

/* ------------------------------------------------------------------ */
/* English-like text                                                   */

static const char *const dict_src[] = {
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "it",
    "for", "not", "on", "with", "he", "as", "you", "do", "at", "this",
    "but", "his", "by", "from", "they", "we", "say", "her", "she", "or",
    "an", "will", "my", "one", "all", "would", "there", "their", "what", "so",
    "up", "out", "if", "about", "who", "get", "which", "go", "me", "when",
    "make", "can", "like", "time", "no", "just", "him", "know", "take", "people",
    "into", "year", "your", "good", "some", "could", "them", "see", "other", "than",
    "then", "now", "look", "only", "come", "its", "over", "think", "also", "back",
    "after", "use", "two", "how", "our", "work", "first", "well", "way", "even",
    "new", "want", "because", "any", "these", "give", "day", "most", "us", "is",
    "was", "are", "were", "been", "has", "had", "did", "said", "made", "went",
    "through", "where", "much", "before", "right", "too", "mean", "old", "same", "tell",
    "boy", "follow", "came", "show", "around", "form", "three", "small", "set", "put",
    "end", "does", "another", "large", "must", "big", "high", "such", "why", "ask",
    "men", "change", "light", "kind", "off", "need", "house", "picture", "try", "again",
    "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "head",
    "stand", "own", "page", "should", "country", "found", "answer", "school", "grow", "study",
    "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state", "keep",
    "eye", "never", "last", "let", "thought", "city", "tree", "cross", "farm", "hard",
    "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run",
    "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem",
    "together", "next", "white", "children", "begin", "got", "walk", "example", "ease", "paper",
    "group", "always", "music", "those", "both", "mark", "often", "letter", "until", "mile",
    "river", "car", "feet", "care", "second", "book", "carry", "took", "science", "eat",
    "room", "friend", "began", "idea", "fish", "mountain", "stop", "once", "base", "hear",
    "horse", "cut", "sure", "watch", "color", "face", "wood", "main", "enough", "plain",
};
#define NWORDS (sizeof dict_src / sizeof dict_src[0])

/* Common word groups: real text repeats phrases, which is what LZ-style
 * compressors (lz4) find; random single words alone compress too poorly. */
static const char *const phrase_src[] = {
    "of the", "in the", "to the", "on the", "and the", "for the", "at the", "with the",
    "from the", "by the", "it is", "it was", "there is", "there was", "one of the",
    "as well as", "at the end of", "in front of", "some of the", "a lot of", "is one",
    "will be", "would be", "has been", "had been", "he said", "she said", "they were",
    "we have", "you can", "do not", "did not", "is not", "can be", "such as",
    "out of the", "more than", "the same", "each other", "at first", "as long as",
    "in order to", "all of the", "the first time", "over the", "into the", "after the",
    "the old man",
};
#define NPHRASES (sizeof phrase_src / sizeof phrase_src[0])
#define NENTRIES (NWORDS + NPHRASES)

/* Tuned so that text pages compress about like real English text
 * (measured against license texts: per 4 KiB page lz4 ~1.55x, zstd -1 ~2.4x;
 * as a stream lz4 ~2x, zstd -1 ~3x). */
#define PH 3    /* eighths of choices that are phrases */
#define TOPP 2  /* eighths that are one of the TOPN most common words */
#define TOPN 16

/* Entries 0..NWORDS-1 are words, NWORDS.. are phrases. */
static uint8_t dict_lower[NENTRIES][SLOT] __attribute__((aligned(16)));
static uint8_t dict_upper[NENTRIES][SLOT] __attribute__((aligned(16)));
static uint8_t dict_len[NENTRIES];

static void dict_init(void)
{
    for (size_t i = 0; i < NENTRIES; i++) {
        const char *src = i < NWORDS ? dict_src[i] : phrase_src[i - NWORDS];
        size_t n = strlen(src);
        if (n >= SLOT) abort();
        memcpy(dict_lower[i], src, n);
        memcpy(dict_upper[i], src, n);
        dict_upper[i][0] = (uint8_t)(dict_upper[i][0] - 'a' + 'A');
        dict_len[i] = (uint8_t)n;
    }
}

/* buf must have room for PAGE_SIZE + 32 bytes. */
static void gen_text(uint8_t *buf, uint64_t s)
{
    unsigned pos = 0, col = 0;
    int cap = 1;
    while (pos < PAGE_SIZE) {
        uint64_t r = xorshift64(&s);
        /* Word choice (a rough Zipf shape): PH/8 of the time a phrase,
         * TOPP/8 one of the TOPN most common words, otherwise uniform over
         * the dictionary. */
        unsigned w, sel = (unsigned)r & 7, x = (unsigned)(r >> 8) & 0xffff;
        if (sel < PH)
            w = (unsigned)NWORDS + ((x * (unsigned)NPHRASES) >> 16);
        else if (sel < PH + TOPP)
            w = (x * TOPN) >> 16;
        else
            w = (x * (unsigned)NWORDS) >> 16;
        memcpy(buf + pos, cap ? dict_upper[w] : dict_lower[w], SLOT);
        pos += dict_len[w];
        col += dict_len[w];
        cap = 0;
        unsigned p = (unsigned)(r >> 24) & 0xff;
        if (p < 22) {
            buf[pos++] = '.';
            cap = 1;
        } else if (p < 36) {
            buf[pos++] = ',';
        } else if (p == 36) {
            /* an occasional number, as real text has */
            unsigned v = (unsigned)(r >> 40) & 0x3ff;
            buf[pos++] = ' ';
            buf[pos++] = (uint8_t)('0' + (v & 7) + 1);
            buf[pos++] = (uint8_t)('0' + ((v >> 3) % 10));
            col += 3;
        }
        if (col >= 68) {
            buf[pos++] = '\n';
            col = 0;
            if (cap && ((r >> 32) & 3) == 0) buf[pos++] = '\n'; /* paragraph */
        } else {
            buf[pos++] = ' ';
            col++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Page contents                                                       */

static uint8_t scratch[PAGE_SIZE + 64] __attribute__((aligned(64)));

static void gen_random(uint8_t *dst, uint64_t s)
{
    uint64_t *w = (uint64_t *)dst;
    for (unsigned i = 0; i < PAGE_SIZE / 8; i += 4) {
        w[i] = xorshift64(&s);
        w[i + 1] = xorshift64(&s);
        w[i + 2] = xorshift64(&s);
        w[i + 3] = xorshift64(&s);
    }
}

/* Expected content of page idx at generation gen, into scratch.
 * Returns NULL for a zero page (scratch untouched). */
static const uint8_t *expected_page(uint64_t idx, uint32_t gen)
{
    uint64_t s = page_state(idx, gen);
    switch (ptype[idx]) {
    case T_ZERO: return NULL;
    case T_TEXT: gen_text(scratch, s); return scratch;
    default: gen_random(scratch, s); return scratch;
    }
}

static void write_page(uint64_t idx)
{
    uint8_t *dst = region + idx * PAGE_SIZE;
    uint64_t s = page_state(idx, generation[idx]);
    switch (ptype[idx]) {
    case T_ZERO: memset(dst, 0, PAGE_SIZE); break;
    case T_TEXT: gen_text(scratch, s); memcpy(dst, scratch, PAGE_SIZE); break;
    default: gen_random(dst, s); break;
    }
}

static void disk_block_content(uint8_t *dst, uint64_t idx, uint32_t gen)
{
    uint64_t st = mix64((cfg_seed ^ 0x6a09e667f3bcc909ULL) * 0x9e3779b97f4a7c15ULL + idx * 0xbb67ae8584caa73bULL + gen);
    uint64_t *w = (uint64_t *)dst;
    w[0] = 0x4b5349442d595246ULL; /* "FRY-DISK" */
    w[1] = idx;
    w[2] = gen;
    for (size_t i = 3; i < PAGE_SIZE / 8; i++) w[i] = xorshift64(&st);
}

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (unsigned i = 0; i < PAGE_SIZE / 8; i += 4) acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3];
    return acc == 0;
}

static void fill_region(void)
{
    for (uint64_t i = 0; i < npages; i++) {
        ptype[i] = (uint8_t)page_type_of(i);
        generation[i] = 0;
        write_page(i);
    }
}

static uint64_t check_region(uint64_t *first_bad)
{
    uint64_t bad = 0;
    *first_bad = 0;
    for (uint64_t i = 0; i < npages; i++) {
        const uint8_t *cur = region + i * PAGE_SIZE;
        const uint8_t *exp = expected_page(i, generation[i]);
        int ok = exp ? memcmp(cur, exp, PAGE_SIZE) == 0 : page_is_zero(cur);
        if (!ok) {
            if (bad == 0) *first_bad = i;
            bad++;
        }
    }
    return bad;
}

/* FNV-1a 64 over the bytes of the region, in address order. */
static uint64_t digest_region(void)
{
    const uint64_t prime = 0x100000001b3ULL;
    uint64_t h = 0xcbf29ce484222325ULL;
    const uint64_t *w = (const uint64_t *)region;
    uint64_t n = npages * (PAGE_SIZE / 8);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = w[i]; /* little-endian: low byte first */
        h = (h ^ (v & 0xff)) * prime;
        h = (h ^ ((v >> 8) & 0xff)) * prime;
        h = (h ^ ((v >> 16) & 0xff)) * prime;
        h = (h ^ ((v >> 24) & 0xff)) * prime;
        h = (h ^ ((v >> 32) & 0xff)) * prime;
        h = (h ^ ((v >> 40) & 0xff)) * prime;
        h = (h ^ ((v >> 48) & 0xff)) * prime;
        h = (h ^ (v >> 56)) * prime;
    }
    return h;
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, 100);
        } else {
            return; /* console gone: nothing useful to do */
        }
    }
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    write_all(STDOUT_FILENO, buf, (size_t)n);
}

/* ------------------------------------------------------------------ */
/* Parameters                                                          */

static int parse_mix(const char *v)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(v, mix_names[i]) == 0) return i;
    return -1;
}

static int parse_rate(const char *v, double *out)
{
    char *end;
    errno = 0;
    double r = strtod(v, &end);
    if (errno || end == v || *end != '\0' || !(r >= 0.0) || r > 1e6) return -1;
    *out = r;
    return 0;
}

static void parse_cmdline(void)
{
    char buf[4096];
    size_t len = 0;
    const char *env = getenv("FERRY_CMDLINE");
    if (env) {
        len = strlen(env);
        if (len >= sizeof buf) len = sizeof buf - 1;
        memcpy(buf, env, len);
    } else {
        int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = read(fd, buf, sizeof buf - 1);
            if (n > 0) len = (size_t)n;
            close(fd);
        }
    }
    buf[len] = '\0';
    char *save = NULL;
    for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(tok, "ferry.", 6) != 0) continue;
        char *eq = strchr(tok, '=');
        if (!eq) continue;
        *eq = '\0';
        const char *key = tok + 6, *val = eq + 1;
        if (strcmp(key, "mem_mib") == 0) {
            char *end;
            unsigned long v = strtoul(val, &end, 10);
            if (*end == '\0' && v > 0) cfg_mem_mib = v;
            else say("FERRY-ERR bad ferry.mem_mib=%s", val);
        } else if (strcmp(key, "dirty_mibps") == 0) {
            if (parse_rate(val, &cfg_rate) != 0) say("FERRY-ERR bad ferry.dirty_mibps=%s", val);
        } else if (strcmp(key, "mix") == 0) {
            int m = parse_mix(val);
            if (m >= 0) cfg_mix = m;
            else say("FERRY-ERR bad ferry.mix=%s", val);
        } else if (strcmp(key, "disk") == 0) {
            if (strlen(val) < sizeof cfg_disk) strcpy(cfg_disk, val);
            else say("FERRY-ERR bad ferry.disk=%s", val);
        } else if (strcmp(key, "disk_mib") == 0) {
            char *end;
            unsigned long v = strtoul(val, &end, 10);
            if (*end == '\0' && v > 0) cfg_disk_mib = v;
            else say("FERRY-ERR bad ferry.disk_mib=%s", val);
        } else if (strcmp(key, "disk_wps") == 0) {
            if (parse_rate(val, &cfg_disk_wps) != 0) say("FERRY-ERR bad ferry.disk_wps=%s", val);
        } else if (strcmp(key, "seed") == 0) {
            char *end;
            unsigned long long v = strtoull(val, &end, 10);
            if (*end == '\0') cfg_seed = v;
            else say("FERRY-ERR bad ferry.seed=%s", val);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Setup                                                               */

static int alloc_region(void)
{
    npages = (uint64_t)cfg_mem_mib * (1024 * 1024 / PAGE_SIZE);
    size_t bytes = (size_t)npages * PAGE_SIZE;
    region = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) return -1;
    madvise(region, bytes, MADV_NOHUGEPAGE); /* keep 4 KiB granularity */
    generation = calloc(npages, sizeof *generation);
    ptype = calloc(npages, 1);
    if (!generation || !ptype) return -1;
    return 0;
}

static int disk_open(void)
{
    if (cfg_disk[0] == '\0') return 0;
    /* The virtio disk may show up a moment after the module loaded. */
    for (int i = 0; i < 100 && disk_fd < 0; i++) {
        disk_fd = open(cfg_disk, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (disk_fd < 0) usleep(50000);
    }
    if (disk_fd < 0) return -1;
    disk_blocks = (uint64_t)cfg_disk_mib * (1024 * 1024 / PAGE_SIZE);
    disk_gen = calloc(disk_blocks, sizeof *disk_gen);
    disk_buf = aligned_alloc(4096, PAGE_SIZE);
    disk_rbuf = aligned_alloc(4096, PAGE_SIZE);
    if (!disk_gen || !disk_buf || !disk_rbuf) return -1;
    disk_pick = mix64(cfg_seed ^ 0x510e527fade682d1ULL) | 1;
    return 0;
}

static int disk_write_one(void)
{
    uint64_t r = xorshift64(&disk_pick);
    uint64_t idx = ((r >> 32) * disk_blocks) >> 32;
    uint32_t gen = disk_gen[idx] + 1;
    disk_block_content(disk_buf, idx, gen);
    if (pwrite(disk_fd, disk_buf, PAGE_SIZE, (off_t)(idx * PAGE_SIZE)) != (ssize_t)PAGE_SIZE) {
        say("FERRY-ERR disk write at block %llu: %s", (unsigned long long)idx, strerror(errno));
        return -1;
    }
    /* Counted only once the device acknowledged the write. */
    if (disk_gen[idx] == 0) disk_written_blocks++;
    disk_gen[idx] = gen;
    disk_writes++;
    return 0;
}

/* Writes the disk blocks due now (same pacing scheme as the page dirtier). */
static void disk_tick(void)
{
    if (disk_fd < 0 || paused || cfg_disk_wps <= 0.0) return;
    uint64_t target = (uint64_t)((now_s() - disk_t0) * cfg_disk_wps);
    if (target <= disk_due) return;
    uint64_t due = target - disk_due;
    uint64_t max_backlog = (uint64_t)(cfg_disk_wps * 0.25) + 1;
    if (due > max_backlog) {
        disk_due += due - max_backlog;
        due = max_backlog;
    }
    for (uint64_t i = 0; i < due; i++) {
        disk_due++;
        if (disk_write_one() != 0) return;
    }
}

/* Reads back every block written so far; returns how many differ. */
static uint64_t disk_check(uint64_t *first_bad)
{
    uint64_t bad = 0;
    *first_bad = 0;
    for (uint64_t i = 0; i < disk_blocks; i++) {
        if (disk_gen[i] == 0) continue;
        disk_block_content(disk_buf, i, disk_gen[i]);
        if (pread(disk_fd, disk_rbuf, PAGE_SIZE, (off_t)(i * PAGE_SIZE)) != (ssize_t)PAGE_SIZE ||
            memcmp(disk_buf, disk_rbuf, PAGE_SIZE) != 0) {
            if (bad == 0) *first_bad = i;
            bad++;
        }
    }
    return bad;
}

static void console_setup(void)
{
    if (isatty(STDIN_FILENO)) {
        struct termios t;
        if (tcgetattr(STDIN_FILENO, &t) == 0) {
            t.c_iflag &= ~(unsigned)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON | IXOFF);
            t.c_lflag &= ~(unsigned)(ECHO | ECHONL | ECHOE | ECHOK | ICANON | ISIG | IEXTEN);
            t.c_cflag |= CLOCAL | CREAD;
            t.c_oflag |= OPOST | ONLCR; /* keep "\n" -> "\r\n" on output */
            t.c_cc[VMIN] = 1;
            t.c_cc[VTIME] = 0;
            tcsetattr(STDIN_FILENO, TCSANOW, &t);
        }
    }
    int fl = fcntl(STDIN_FILENO, F_GETFL);
    if (fl >= 0) fcntl(STDIN_FILENO, F_SETFL, fl | O_NONBLOCK);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ */
/* Main loop                                                           */

static double pace_t0;    /* start of the current pacing period */
static uint64_t pace_due; /* writes scheduled-and-accounted in this period */
static uint64_t pick_state;

static void pace_rebase(void)
{
    pace_t0 = now_s();
    pace_due = 0;
    disk_t0 = pace_t0;
    disk_due = 0;
}

static void dirty_one(void)
{
    uint64_t r = xorshift64(&pick_state);
    uint64_t idx = ((r >> 32) * npages) >> 32;
    generation[idx]++;
    write_page(idx);
    total_writes++;
}

/* Writes the pages due now. Returns 1 if it stopped early (more are due). */
static int dirty_tick(void)
{
    if (paused || cfg_rate <= 0.0) return 0;
    double pps = cfg_rate * (1024.0 * 1024.0 / PAGE_SIZE);
    double t = now_s();
    uint64_t target = (uint64_t)((t - pace_t0) * pps);
    if (target <= pace_due) return 0;
    uint64_t due = target - pace_due;
    /* Never carry more than 250 ms of backlog (we cannot keep up, or the
     * guest was stopped): drop the excess instead of bursting. */
    uint64_t max_backlog = (uint64_t)(pps * 0.25) + 1;
    if (due > max_backlog) {
        pace_due += due - max_backlog;
        due = max_backlog;
    }
    for (uint64_t i = 0; i < due; i++) {
        dirty_one();
        pace_due++;
        if ((i & 15) == 15 && now_s() - t > 0.02) return 1; /* go answer the console */
    }
    return 0;
}

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = '\0';
    size_t i = 0;
    while (s[i] == ' ' || s[i] == '\t') i++;
    if (i) memmove(s, s + i, n - i + 1);
}

static void handle_command(char *line)
{
    trim(line);
    if (line[0] == '\0') return;
    if (strcmp(line, "check") == 0) {
        uint64_t first, dfirst = 0;
        uint64_t bad = check_region(&first);
        uint64_t dbad = disk_fd >= 0 ? disk_check(&dfirst) : 0;
        char disk_ok[96] = "", disk_fail[96] = "";
        if (disk_fd >= 0) {
            snprintf(disk_ok, sizeof disk_ok, " disk_blocks=%llu disk_writes=%llu",
                     (unsigned long long)disk_written_blocks, (unsigned long long)disk_writes);
            snprintf(disk_fail, sizeof disk_fail, " disk_bad=%llu disk_first=%llu",
                     (unsigned long long)dbad, (unsigned long long)dfirst);
        }
        if (bad == 0 && dbad == 0)
            say("FERRY-CHECK ok pages=%llu writes=%llu%s", (unsigned long long)npages,
                (unsigned long long)total_writes, disk_ok);
        else
            say("FERRY-CHECK fail bad=%llu first=%llu%s", (unsigned long long)bad,
                (unsigned long long)(bad ? first : 0), disk_fail);
        pace_rebase();
    } else if (strcmp(line, "digest") == 0) {
        say("FERRY-DIGEST %016llx", (unsigned long long)digest_region());
        pace_rebase();
    } else if (strncmp(line, "rate", 4) == 0 && (line[4] == ' ' || line[4] == '\t')) {
        char *arg = line + 5;
        while (*arg == ' ' || *arg == '\t') arg++;
        double r;
        if (parse_rate(arg, &r) == 0) {
            cfg_rate = r;
            pace_rebase();
            say("FERRY-RATE %g", cfg_rate);
        } else {
            say("FERRY-ERR bad rate");
        }
    } else if (strcmp(line, "pause") == 0) {
        paused = 1;
        say("FERRY-PAUSED");
    } else if (strcmp(line, "resume") == 0) {
        paused = 0;
        pace_rebase();
        say("FERRY-RESUMED");
    } else if (strcmp(line, "ping") == 0) {
        say("FERRY-PONG writes=%llu", (unsigned long long)total_writes);
    } else {
        say("FERRY-ERR unknown command");
    }
}

static char linebuf[256];
static size_t linelen;
static int line_overflow;
static int stdin_open = 1;

static void read_console(void)
{
    char buf[256];
    for (;;) {
        ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            stdin_open = 0; /* EOF or error: stop listening, keep running */
            return;
        }
        for (ssize_t i = 0; i < n; i++) {
            char c = buf[i];
            if (c == '\n' || c == '\r') {
                if (line_overflow) {
                    say("FERRY-ERR unknown command");
                } else if (linelen > 0) {
                    linebuf[linelen] = '\0';
                    handle_command(linebuf);
                }
                linelen = 0;
                line_overflow = 0;
            } else if (linelen + 1 < sizeof linebuf) {
                linebuf[linelen++] = c;
            } else {
                line_overflow = 1;
            }
        }
    }
}

static int dump_main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s --dump <mib> <mix> <seed>\n", argv[0]);
        return 2;
    }
    cfg_mem_mib = strtoul(argv[2], NULL, 10);
    cfg_mix = parse_mix(argv[3]);
    cfg_seed = strtoull(argv[4], NULL, 10);
    if (cfg_mem_mib == 0 || cfg_mix < 0) return 2;
    dict_init();
    if (alloc_region() != 0) return 1;
    fill_region();
    write_all(STDOUT_FILENO, (const char *)region, (size_t)(npages * PAGE_SIZE));
    fprintf(stderr, "digest %016llx\n", (unsigned long long)digest_region());
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--dump") == 0) return dump_main(argc, argv);

    console_setup();
    parse_cmdline();
    dict_init();
    if (alloc_region() != 0) {
        say("FERRY-ERR cannot allocate %lu MiB", cfg_mem_mib);
        return 1;
    }
    fill_region();
    pick_state = mix64(cfg_seed ^ 0x3c6ef372fe94f82bULL) | 1;
    if (disk_open() != 0) {
        say("FERRY-ERR cannot use disk %s: %s", cfg_disk, strerror(errno));
        return 1;
    }

    double ready = now_s();
    say("FERRY-READY pages=%llu mix=%s rate=%g", (unsigned long long)npages, mix_names[cfg_mix],
        cfg_rate);
    pace_rebase();
    uint64_t hb_n = 1; /* next heartbeat at ready + hb_n seconds */

    for (;;) {
        int more = dirty_tick();
        disk_tick();

        double t = now_s();
        if (t >= ready + (double)hb_n) {
            uint64_t secs = (uint64_t)(t - ready);
            say("FERRY-HB t=%llu writes=%llu", (unsigned long long)secs,
                (unsigned long long)total_writes);
            hb_n = secs + 1;
        }

        int timeout_ms;
        if (more) {
            timeout_ms = 0;
        } else {
            double until_hb = ready + (double)hb_n - now_s();
            timeout_ms = (!paused && (cfg_rate > 0.0 || (disk_fd >= 0 && cfg_disk_wps > 0.0))) ? 5 : 1000;
            int hb_ms = until_hb <= 0 ? 0 : (int)(until_hb * 1000.0) + 1;
            if (hb_ms < timeout_ms) timeout_ms = hb_ms;
        }
        struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
        int r = poll(&p, stdin_open ? 1 : 0, timeout_ms);
        if (r > 0 && (p.revents & POLLIN))
            read_console();
        else if (r > 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL)))
            stdin_open = 0; /* console hung up: keep dirtying, stop listening */
    }
}
