/* The compiled engine of bench/loadgen.py (--engine c): HTTP/1.1 keep-alive load on epoll, one thread.
 *
 * Not a tool of its own: bench/loadgen_c.py compiles it (cc -O2), writes its inputs and reads its outputs,
 * and bench/loadgen.py turns them into the same JSON object its Python engine prints.
 *
 *   loadgen_c --host 127.0.0.1 --port 8000 --templates T --mode open --due D --connections 64
 *             --warmup 2 --duration 10 --drain 2 --timeout 10 --max-requests N --raw OUT
 *
 * T  templates: "NXLGT1\n<count> <id_digits> <tag_len>\n<tag>" then per template "<pre_len> <post_len>\n"
 *    and the bytes; request n is pre[n % count] + tag + n (zero-padded to id_digits) + post[n % count].
 * D  open mode: the due times, float64 seconds from the start (t0), ascending, as bench/loadgen.py draws them.
 * Writes one JSON line to stdout (counts, statuses, errors, CPU) and to OUT the recorded latencies (float64 s),
 * the dispatch lags (float64 s) and the sample response's body bytes, in that order.
 *
 * open:   request i is released at t0 + due[i] (a timerfd, no spinning) into a FIFO and sent on the next free
 *         connection; its latency counts from the due time (no coordinated omission).
 * closed: every connection sends request n+1 as soon as the answer to n arrives; latency from the send.
 * Recorded: due (or send) time >= t0 + warmup and answered by the end of the window (open: + drain).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_RESPONSE (64u << 20) /* a longer answer is a protocol error, not an allocation */
#define SAMPLE_MAX 600

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "loadgen_c: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- inputs ------------------------------------------------------------------------------------------- */

typedef struct {
    char *pre, *post;
    size_t pre_len, post_len;
} Template;

static Template *tpls;
static size_t n_tpl, max_req_len;
static int id_digits;
static char tag[256];
static size_t tag_len;

static void read_exact(FILE *f, void *buf, size_t n, const char *path) {
    if (n && fread(buf, 1, n, f) != n) die("%s: truncated templates file", path);
}

static void load_templates(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open templates file %s", path);
    char magic[8] = {0};
    read_exact(f, magic, 7, path);
    if (memcmp(magic, "NXLGT1\n", 7) != 0) die("%s: not a templates file (bad magic)", path);
    long count, digits, tlen;
    if (fscanf(f, "%ld %ld %ld", &count, &digits, &tlen) != 3 || fgetc(f) != '\n' || count <= 0 || digits < 0 ||
        tlen < 0 || tlen >= (long)sizeof tag)
        die("%s: bad templates header", path);
    n_tpl = (size_t)count, id_digits = (int)digits, tag_len = (size_t)tlen;
    read_exact(f, tag, tag_len, path);
    tpls = calloc(n_tpl, sizeof *tpls);
    if (!tpls) die("out of memory for %s", path);
    for (size_t i = 0; i < n_tpl; i++) {
        long a, b;
        if (fscanf(f, "%ld %ld", &a, &b) != 2 || fgetc(f) != '\n' || a < 0 || b < 0)
            die("%s: bad template entry", path);
        Template *t = &tpls[i];
        t->pre_len = (size_t)a, t->post_len = (size_t)b;
        t->pre = malloc(t->pre_len + 1), t->post = malloc(t->post_len + 1);
        if (!t->pre || !t->post) die("out of memory for %s", path);
        read_exact(f, t->pre, t->pre_len, path);
        read_exact(f, t->post, t->post_len, path);
        size_t len = t->pre_len + t->post_len;
        if (len > max_req_len) max_req_len = len;
    }
    fclose(f);
    max_req_len += tag_len + (size_t)id_digits + 24;
}

static double *load_due(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open due-times file %s", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 0 || size % 8) die("%s: not a float64 array", path);
    *n = (size_t)size / 8;
    double *due = malloc((size_t)size + 8);
    if (!due) die("out of memory for %s", path);
    read_exact(f, due, (size_t)size, path);
    fclose(f);
    return due;
}

/* request n into buf; returns its length */
static size_t build_request(char *buf, uint64_t n) {
    const Template *t = &tpls[n % n_tpl];
    size_t len = 0;
    memcpy(buf, t->pre, t->pre_len), len += t->pre_len;
    if (id_digits || tag_len) {
        memcpy(buf + len, tag, tag_len), len += tag_len;
        uint64_t v = n;
        if (id_digits < 19) {
            uint64_t mod = 1;
            for (int i = 0; i < id_digits; i++) mod *= 10;
            v = n % mod;
        }
        if (id_digits) len += (size_t)sprintf(buf + len, "%0*llu", id_digits, (unsigned long long)v);
    }
    memcpy(buf + len, t->post, t->post_len), len += t->post_len;
    return len;
}

/* ---- results ------------------------------------------------------------------------------------------ */

enum { E_TIMEOUT, E_INCOMPLETE, E_PROTOCOL, E_RESET, E_PIPE, E_REFUSED, E_OS, N_ERR };
static const char *ERR_NAMES[N_ERR] = {"TimeoutError",         "IncompleteReadError", "ProtocolError",
                                       "ConnectionResetError", "BrokenPipeError",     "ConnectionRefusedError",
                                       "OSError"};
static long errors[N_ERR];
static long statuses[1000];
static double *lat;
static size_t n_lat, cap_lat;
static double rec_from, rec_until;
static char sample[SAMPLE_MAX];
static size_t sample_len;
static int sample_status; /* 0: none yet */
static long sent;

static int os_error(int err) {
    return err == ECONNRESET ? E_RESET : err == EPIPE ? E_PIPE : err == ECONNREFUSED ? E_REFUSED : E_OS;
}

static void record(double due, double done, int status, const char *body, size_t blen) {
    if (!(rec_from <= due && done <= rec_until)) return;
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        lat = realloc(lat, cap_lat * sizeof *lat);
        if (!lat) die("%s", "out of memory for latencies");
    }
    lat[n_lat++] = done - due;
    statuses[status]++;
    /* the first answer, replaced once by the first error answer: the sample says what went wrong */
    if (!sample_status || (status >= 400 && sample_status < 400)) {
        sample_status = status;
        sample_len = blen < SAMPLE_MAX ? blen : SAMPLE_MAX;
        memcpy(sample, body, sample_len);
    }
}

/* ---- HTTP/1.1 responses ------------------------------------------------------------------------------- */

/* 1: a whole response in b[0..len) (status, *used bytes, body de-chunked into out[0..*olen), at most ocap);
 * 0: not yet; -1: not HTTP/1.1 this client understands */
static int parse_response(const char *b, size_t len, int *status, size_t *used, char *out, size_t ocap,
                          size_t *olen) {
    const char *end = memmem(b, len, "\r\n\r\n", 4);
    if (!end) return len > (1u << 20) ? -1 : 0;
    size_t head = (size_t)(end - b) + 4;
    if (head < 16 || memcmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ') return -1;
    int st = 0;
    for (int i = 9; i < 12; i++) {
        if (b[i] < '0' || b[i] > '9') return -1;
        st = st * 10 + (b[i] - '0');
    }
    long long length = -1;
    int chunked = 0;
    for (const char *line = (const char *)memmem(b, head, "\r\n", 2) + 2; line < end;) {
        const char *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon) {
            size_t nlen = (size_t)(colon - line);
            const char *v = colon + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            if (nlen == 14 && strncasecmp(line, "content-length", 14) == 0) {
                char *stop;
                length = strtoll(v, &stop, 10);
                if (stop == v || length < 0) return -1;
            } else if (nlen == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
                for (const char *p = v; p + 7 <= eol; p++)
                    if (strncasecmp(p, "chunked", 7) == 0) chunked = 1;
            }
        }
        line = eol + 2;
    }
    *status = st, *olen = 0;
    if (chunked) {
        size_t p = head;
        for (;;) {
            const char *eol = memmem(b + p, len - p, "\r\n", 2);
            if (!eol) return len - p > 64 ? -1 : 0;
            char *stop;
            unsigned long long size = strtoull(b + p, &stop, 16);
            if (stop == b + p || (stop < eol && *stop != ';' && *stop != ' ')) return -1;
            size_t data = (size_t)(eol - b) + 2;
            if (size == 0) { /* no trailers: the last chunk is followed by an empty line */
                if (len < data + 2) return 0;
                if (memcmp(b + data, "\r\n", 2) != 0) return -1;
                *used = data + 2;
                return 1;
            }
            if (size > MAX_RESPONSE) return -1;
            if (len < data + size + 2) return 0;
            size_t take = *olen + size <= ocap ? size : ocap - *olen;
            memcpy(out + *olen, b + data, take), *olen += take;
            p = data + size + 2;
        }
    }
    if (length < 0) return -1; /* neither Content-Length nor chunked: no way to find the end */
    if (length > MAX_RESPONSE) return -1;
    if (len < head + (size_t)length) return 0;
    *used = head + (size_t)length;
    *olen = (size_t)length < ocap ? (size_t)length : ocap;
    memcpy(out, b + head, *olen);
    return 1;
}

/* ---- connections -------------------------------------------------------------------------------------- */

enum { C_CONNECTING, C_IDLE, C_BUSY, C_DOWN, C_DONE };

typedef struct {
    int fd, state, in_idle;
    char *wbuf;
    size_t wlen, woff;
    char *rbuf;
    size_t rlen, rcap;
    int last_err;
    double due, sent_at, retry_at; /* due: the due time (open) or the send time (closed) */
} Conn;

static Conn *conns;
static int n_conn, ep;
static struct sockaddr_storage addr;
static socklen_t addr_len;
static int *idle_ring, idle_head, idle_count;
static double timeout_s;

static void idle_push(int i) {
    if (conns[i].in_idle) return;
    conns[i].in_idle = 1;
    idle_ring[(idle_head + idle_count++) % n_conn] = i;
}

/* the connection that waited longest, as asyncio's queue hands items to its waiters */
static int idle_pop(void) {
    while (idle_count) {
        int i = idle_ring[idle_head];
        idle_head = (idle_head + 1) % n_conn, idle_count--;
        conns[i].in_idle = 0;
        if (conns[i].state == C_IDLE) return i;
    }
    return -1;
}

static void watch(Conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(ep, op, c->fd, &ev) != 0) die("epoll_ctl: %s", strerror(errno));
}

/* 0: connecting (or connected); else the errno of a connect that failed at once */
static int conn_open(Conn *c) {
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return errno;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->rlen = 0, c->wlen = c->woff = 0;
    if (connect(c->fd, (struct sockaddr *)&addr, addr_len) != 0 && errno != EINPROGRESS) {
        int err = errno;
        close(c->fd), c->fd = -1;
        return err;
    }
    c->state = C_CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static void conn_close(Conn *c) {
    if (c->fd >= 0) epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL), close(c->fd);
    c->fd = -1;
}

/* an exchange failed: count it, drop the connection, open a new one at once (as the Python engine does) */
static void conn_fail(Conn *c, int kind, double now) {
    errors[kind]++;
    conn_close(c);
    c->state = C_DOWN, c->retry_at = now;
}

static void conn_send(Conn *c, uint64_t n, double due, double now) {
    c->wlen = build_request(c->wbuf, n), c->woff = 0;
    c->due = due, c->sent_at = now, c->state = C_BUSY, c->rlen = 0;
    sent++;
    ssize_t k = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL);
    if (k < 0 && errno != EAGAIN) {
        conn_fail(c, os_error(errno), now);
        return;
    }
    c->woff = k > 0 ? (size_t)k : 0;
    if (c->woff < c->wlen) watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
}

/* readable: 1 when the answer in flight is complete (recorded) and the connection idle again */
static int conn_read(Conn *c, double *now) {
    for (;;) {
        if (c->rcap - c->rlen < 16384) {
            if (c->rcap >= MAX_RESPONSE) return conn_fail(c, E_PROTOCOL, *now), 0;
            c->rcap *= 2;
            c->rbuf = realloc(c->rbuf, c->rcap);
            if (!c->rbuf) die("%s", "out of memory for a response");
        }
        size_t space = c->rcap - c->rlen;
        ssize_t k = recv(c->fd, c->rbuf + c->rlen, space, 0);
        if (k < 0 && errno == EAGAIN) break;
        if (k < 0) return conn_fail(c, os_error(errno), *now), 0;
        if (k == 0) { /* the server closed: mid-answer that is an error; while idle, reconnect quietly */
            if (c->state == C_BUSY) return conn_fail(c, E_INCOMPLETE, *now), 0;
            conn_close(c);
            c->state = C_DOWN, c->retry_at = *now;
            return 0;
        }
        c->rlen += (size_t)k;
        if ((size_t)k < space) break; /* the socket is drained */
    }
    if (c->state != C_BUSY) { /* bytes nobody asked for */
        if (c->rlen) conn_fail(c, E_PROTOCOL, *now);
        return 0;
    }
    int status;
    size_t used, blen;
    static char body[SAMPLE_MAX];
    int r = parse_response(c->rbuf, c->rlen, &status, &used, body, SAMPLE_MAX, &blen);
    if (r < 0) return conn_fail(c, E_PROTOCOL, *now), 0;
    if (r == 0) return 0;
    *now = now_s();
    record(c->due, *now, status, body, blen);
    memmove(c->rbuf, c->rbuf + used, c->rlen - used), c->rlen -= used;
    c->state = C_IDLE;
    return 1;
}

static void conn_writable(Conn *c, double now) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            c->last_err = err;
            errors[os_error(err)]++;
            conn_close(c);
            c->state = C_DOWN, c->retry_at = now + 0.1; /* the server refuses: don't hammer it */
            return;
        }
        c->state = C_IDLE;
        watch(c, EPOLLIN, EPOLL_CTL_MOD);
        return;
    }
    if (c->state != C_BUSY || c->woff >= c->wlen) return;
    ssize_t k = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
    if (k < 0 && errno != EAGAIN) {
        conn_fail(c, os_error(errno), now);
        return;
    }
    if (k > 0) c->woff += (size_t)k;
    if (c->woff >= c->wlen) watch(c, EPOLLIN, EPOLL_CTL_MOD);
}

/* ---- the loop ----------------------------------------------------------------------------------------- */

static void arm(int tfd, double at) {
    struct itimerspec its = {0};
    if (at < 1e-9) at = 1e-9; /* zero would disarm */
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (double)its.it_value.tv_sec) * 1e9);
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0) die("timerfd_settime: %s", strerror(errno));
}

static const char *arg(int argc, char **argv, const char *name, const char *fallback) {
    for (int i = 1; i + 1 < argc; i += 2)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    if (!fallback) die("missing option %s", name);
    return fallback;
}

static double num(int argc, char **argv, const char *name, const char *fallback) {
    const char *v = arg(argc, argv, name, fallback);
    char *stop;
    double d = strtod(v, &stop);
    if (stop == v || *stop || d < 0) die("bad number for option: %s", name);
    return d;
}

int main(int argc, char **argv) {
    if (argc % 2 == 0) die("%s", "options come in pairs: --name value");
    const char *host = arg(argc, argv, "--host", "127.0.0.1"), *port = arg(argc, argv, "--port", NULL);
    const char *mode = arg(argc, argv, "--mode", "closed"), *raw_path = arg(argc, argv, "--raw", NULL);
    int open_mode = strcmp(mode, "open") == 0;
    if (!open_mode && strcmp(mode, "closed") != 0) die("--mode must be open or closed, not %s", mode);
    n_conn = (int)num(argc, argv, "--connections", "64");
    double warmup = num(argc, argv, "--warmup", "2"), duration = num(argc, argv, "--duration", "10");
    double drain = num(argc, argv, "--drain", "2");
    timeout_s = num(argc, argv, "--timeout", "10");
    uint64_t max_req = (uint64_t)num(argc, argv, "--max-requests", "2000000");
    if (n_conn < 1 || n_conn > 10000) die("%s", "--connections must be 1..10000");
    load_templates(arg(argc, argv, "--templates", NULL));
    size_t n_due = 0;
    double *due = open_mode ? load_due(arg(argc, argv, "--due", NULL), &n_due) : NULL;
    if (n_due > max_req) n_due = (size_t)max_req;
    double *lags = malloc((n_due + 1) * sizeof *lags);

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0) die("cannot resolve the host: %s", gai_strerror(gai));
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen), addr_len = ai->ai_addrlen;
    freeaddrinfo(ai);

    ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (ep < 0 || tfd < 0 || !lags) die("%s", "cannot create epoll or timerfd");
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    conns = calloc((size_t)n_conn, sizeof *conns), idle_ring = calloc((size_t)n_conn, sizeof *idle_ring);
    if (!conns || !idle_ring) die("%s", "out of memory for connections");
    struct epoll_event events[256];

    /* every connection open before the clock starts, as the Python engine's gather */
    int connecting = n_conn;
    for (int i = 0; i < n_conn; i++) {
        Conn *c = &conns[i];
        c->wbuf = malloc(max_req_len), c->rcap = 65536, c->rbuf = malloc(c->rcap);
        if (!c->wbuf || !c->rbuf) die("%s", "out of memory for connections");
        int err = conn_open(c);
        if (err) {
            char msg[512];
            snprintf(msg, sizeof msg, "cannot connect to %s port %s: %s", host, port, strerror(err));
            die("%s", msg);
        }
    }
    while (connecting) {
        int k = epoll_wait(ep, events, 256, 10000);
        if (k == 0) die("%s", "cannot connect: timed out after 10 s");
        for (int e = 0; e < k; e++) {
            Conn *c = &conns[events[e].data.u32];
            if (c->state != C_CONNECTING) continue; /* connected already: its bytes wait for the loop */
            conn_writable(c, now_s());
            if (c->state == C_DOWN) {
                char msg[512];
                snprintf(msg, sizeof msg, "cannot connect to %s port %s: %s", host, port, strerror(c->last_err));
                die("%s", msg);
            }
            connecting--;
            idle_push((int)(c - conns));
        }
    }

    double t0 = now_s() + (open_mode ? 0.05 : 0.0);
    double end = t0 + warmup + duration, stop_at = open_mode ? end + drain : end, armed = -1;
    rec_from = t0 + warmup, rec_until = stop_at;
    size_t released = 0, assigned = 0; /* open: requests [assigned, released) wait for a free connection */
    uint64_t next_n = 0;               /* closed: the next request */
    for (;;) {
        double now = now_s();
        if (now >= stop_at) break;
        int i;
        if (open_mode) {
            for (; released < n_due && t0 + due[released] <= now; released++) lags[released] = now - t0 - due[released];
            for (; assigned < released && (i = idle_pop()) >= 0; assigned++)
                conn_send(&conns[i], assigned, t0 + due[assigned], now);
        } else {
            while (next_n < max_req && (i = idle_pop()) >= 0) conn_send(&conns[i], next_n++, now, now);
        }
        /* time-outs, reconnects, and the next moment something is due */
        int busy = 0;
        double wake = stop_at;
        for (i = 0; i < n_conn; i++) {
            Conn *c = &conns[i];
            if (c->state == C_BUSY && now - c->sent_at >= timeout_s) conn_fail(c, E_TIMEOUT, now);
            if (c->state == C_BUSY) busy++, wake = c->sent_at + timeout_s < wake ? c->sent_at + timeout_s : wake;
            if (c->state == C_DOWN && c->retry_at <= now) {
                int err = conn_open(c);
                if (err) errors[os_error(err)]++, c->state = C_DOWN, c->retry_at = now + 0.1;
            }
            if (c->state == C_DOWN && c->retry_at < wake) wake = c->retry_at;
        }
        if (busy == 0 && (open_mode ? assigned == n_due : next_n >= max_req)) break;
        if (open_mode && released < n_due && t0 + due[released] < wake) wake = t0 + due[released];
        if (wake != armed) arm(tfd, wake), armed = wake;
        int k = epoll_wait(ep, events, 256, -1);
        if (k < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < k; e++) {
            if (events[e].data.u32 == UINT32_MAX) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("timerfd: %s", strerror(errno));
                armed = -1;
                continue;
            }
            Conn *c = &conns[events[e].data.u32];
            uint32_t ev = events[e].events;
            if (c->state == C_CONNECTING || (ev & EPOLLOUT)) conn_writable(c, now_s());
            if ((c->state == C_BUSY || c->state == C_IDLE) && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                double t = now_s();
                conn_read(c, &t);
            }
            if (c->state == C_IDLE) idle_push((int)(c - conns));
        }
    }

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                 ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) * 1e-6;
    FILE *raw = fopen(raw_path, "wb");
    if (!raw || (n_lat && fwrite(lat, sizeof *lat, n_lat, raw) != n_lat) ||
        (released && fwrite(lags, sizeof *lags, released, raw) != released) ||
        (sample_len && fwrite(sample, 1, sample_len, raw) != sample_len) || fclose(raw) != 0)
        die("cannot write %s", raw_path);
    printf("{\"cpu_s\": %.4f, \"sent\": %ld, \"latencies\": %zu, \"lags\": %zu, \"sample_status\": %d, "
           "\"sample_bytes\": %zu, \"statuses\": {",
           cpu, sent, n_lat, released, sample_status, sample_len);
    const char *sep = "";
    for (int s = 0; s < 1000; s++)
        if (statuses[s]) printf("%s\"%d\": %ld", sep, s, statuses[s]), sep = ", ";
    printf("}, \"errors\": {");
    sep = "";
    for (int j = 0; j < N_ERR; j++)
        if (errors[j]) printf("%s\"%s\": %ld", sep, ERR_NAMES[j], errors[j]), sep = ", ";
    printf("}}\n");
    return 0;
}
