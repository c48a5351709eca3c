/* Load generator and target servers for benchmarks/run.py.
 *
 * Compiled at run time by run.py (gcc -O2). C so that the generators and the
 * targets cost a small fraction of the proxy under test, even on two cores.
 * Every subcommand talks to 127.0.0.1 only and prints one result line.
 *
 *   loadgen echo [CLOSE_AFTER]        epoll echo server; prints its port. With
 *                                     CLOSE_AFTER, it closes a connection once
 *                                     it has echoed that many bytes
 *   loadgen bulkd                     bulk target (a thread per connection);
 *                                     prints its port
 *   loadgen bulk up|down SECS STREAMS DSTPORT [SOCKSPORT]
 *   loadgen transfer up|down BYTES DSTPORT
 *                                     one blocking stream of exactly BYTES
 *                                     to or from bulkd, no SOCKS of its own
 *                                     (run under socksify to go through one)
 *   loadgen sessions SECS COUNT CONC eof|close DSTPORT [SOCKSPORT|4:SOCKSPORT]
 *                                     (4:PORT speaks SOCKS4 instead of SOCKS5)
 *   loadgen hold N CONC DSTPORT [SOCKSPORT|4:SOCKSPORT]
 *
 * Servers die with their parent (PR_SET_PDEATHSIG), so a killed run.py
 * leaves none behind.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BULK_BUF (1 << 20)
#define HDR_LEN 16

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static int listen_loopback(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = loopback(0);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    printf("%d\n", ntohs(sa.sin_port));
    fflush(stdout);
    return fd;
}

static void server_setup(void)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1) exit(0);
    signal(SIGPIPE, SIG_IGN);
}

/* ---- blocking helpers (bulk) ---------------------------------------- */

static int read_full(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, (const char *)buf + put, n - put);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        put += w;
    }
    return 0;
}

/* Length of a SOCKS5 reply given its first 5 bytes, or -1. */
static int socks_reply_len(const unsigned char *r)
{
    switch (r[3]) {
    case 1: return 10;
    case 4: return 22;
    case 3: return 7 + r[4];
    default: return -1;
    }
}

static int socks_request(unsigned char *req, int dstport)
{
    req[0] = 5; req[1] = 1; req[2] = 0; req[3] = 1;
    req[4] = 127; req[5] = 0; req[6] = 0; req[7] = 1;
    req[8] = dstport >> 8; req[9] = dstport & 0xff;
    return 10;
}

/* A SOCKS argument: PORT for SOCKS5, 4:PORT for SOCKS4 (sessions, hold). */
static int socks_port(const char *arg, int *socks4)
{
    *socks4 = strncmp(arg, "4:", 2) == 0;
    return atoi(*socks4 ? arg + 2 : arg);
}

/* Blocking SOCKS5 handshake (method none, CONNECT 127.0.0.1:dstport). */
static void socks_blocking(int fd, int dstport)
{
    unsigned char buf[300];
    if (write_full(fd, "\x05\x01\x00", 3) < 0) die("socks greeting");
    if (read_full(fd, buf, 2) < 0 || buf[0] != 5 || buf[1] != 0) {
        fprintf(stderr, "loadgen: proxy refused method none\n");
        exit(2);
    }
    int n = socks_request(buf, dstport);
    if (write_full(fd, buf, n) < 0) die("socks request");
    if (read_full(fd, buf, 5) < 0) die("socks reply");
    int len = socks_reply_len(buf);
    if (buf[1] != 0 || len < 0) {
        fprintf(stderr, "loadgen: CONNECT failed, reply %d\n", buf[1]);
        exit(2);
    }
    if (read_full(fd, buf + 5, len - 5) < 0) die("socks reply");
}

/* ---- bulk target ------------------------------------------------------ */

/* A connection starts with a 16-byte header: 'U', 'D' or 'N', then at
 * offset 8 a native uint64. U: read to EOF, answer the byte count. D: send
 * for that many microseconds, then close. N: send exactly that many bytes,
 * then close. A thread per connection: the parallel bulk workload has
 * several at once, and the threads' CPU time is the process's. */
static void *bulkd_serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(BULK_BUF);
    if (!buf) die("malloc");
    memset(buf, 'x', BULK_BUF);
    struct timeval tv = {60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    unsigned char hdr[HDR_LEN];
    if (read_full(fd, hdr, HDR_LEN) == 0) {
        uint64_t usec;
        memcpy(&usec, hdr + 8, 8);
        if (hdr[0] == 'N') {
            uint64_t left = usec;   /* a byte count, not microseconds */
            while (left > 0) {
                size_t n = left < BULK_BUF ? left : BULK_BUF;
                if (write_full(fd, buf, n) < 0) break;
                left -= n;
            }
        } else if (hdr[0] == 'U') {
            uint64_t total = 0;
            for (;;) {
                ssize_t r = read(fd, buf, BULK_BUF);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) break;
                total += r;
            }
            write_full(fd, &total, 8);
        } else if (hdr[0] == 'D') {
            double end = now() + usec / 1e6;
            while (now() < end)
                if (write_full(fd, buf, BULK_BUF) < 0) break;
        }
    }
    close(fd);
    free(buf);
    return NULL;
}

__attribute__((noreturn)) static void cmd_bulkd(void)
{
    server_setup();
    int lfd = listen_loopback();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) continue;
            die("accept");
        }
        pthread_t t;
        if (pthread_create(&t, &attr, bulkd_serve, (void *)(intptr_t)fd) != 0) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            close(fd);
        }
    }
}

static int connect_blocking(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in sa = loopback(port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    struct timeval tv = {60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* One stream of the bulk client. Upload: SEND until the deadline, then
 * shut down the write side and read the target's 8-byte COUNT; download:
 * read until EOF. */
enum { B_SEND, B_COUNT, B_RECV, B_DONE };

struct stream {
    int fd, phase, cnt_got;
    uint64_t bytes;
    unsigned char hdr[HDR_LEN], cnt[8];
};

static void stream_watch(int ep, struct stream *s, int op, uint32_t events)
{
    struct epoll_event e = {.events = events, .data.ptr = s};
    if (epoll_ctl(ep, op, s->fd, &e) < 0) die("epoll_ctl");
}

/* Connect (and do the SOCKS handshake) blocking; then non-blocking. */
static void stream_open(struct stream *s, int up, uint64_t usec, int dstport, int socksport)
{
    s->fd = connect_blocking(socksport ? socksport : dstport);
    if (socksport) socks_blocking(s->fd, dstport);
    s->phase = up ? B_SEND : B_RECV;
    s->bytes = 0;
    s->cnt_got = 0;
    memset(s->hdr, 0, HDR_LEN);  /* sent when the clock starts */
    s->hdr[0] = up ? 'U' : 'D';
    memcpy(s->hdr + 8, &usec, 8);
}

static void stream_finish_upload(int ep, struct stream *s)
{
    shutdown(s->fd, SHUT_WR);
    s->phase = B_COUNT;
    stream_watch(ep, s, EPOLL_CTL_MOD, EPOLLIN);
}

/* Handle readiness of one stream; returns 1 when it has just finished. */
static int stream_step(int ep, struct stream *s, char *buf)
{
    ssize_t r;
    switch (s->phase) {
    case B_SEND:
        r = write(s->fd, buf, BULK_BUF);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r <= 0) die("upload");
        s->bytes += r;
        return 0;
    case B_COUNT:
        r = read(s->fd, s->cnt + s->cnt_got, 8 - s->cnt_got);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r <= 0) die("upload count");
        if ((s->cnt_got += r) < 8) return 0;
        uint64_t confirmed;
        memcpy(&confirmed, s->cnt, 8);
        if (confirmed != s->bytes) {
            fprintf(stderr, "loadgen: sent %llu bytes, target got %llu\n",
                    (unsigned long long)s->bytes, (unsigned long long)confirmed);
            exit(2);
        }
        break;
    case B_RECV:
        r = read(s->fd, buf, BULK_BUF);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (r < 0) die("download");
        if (r > 0) { s->bytes += r; return 0; }
        break;
    default:
        return 0;
    }
    s->phase = B_DONE;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    return 1;
}

/* STREAMS parallel transfers, driven by one epoll loop. Prints: bytes
 * seconds cpu_seconds, bytes summed over the streams. The clock runs from
 * the headers sent to the last byte delivered on the last stream (upload:
 * every target count received; download: every EOF), so bytes still queued
 * in the proxy are part of the time. */
static int cmd_bulk(int argc, char **argv)
{
    if (argc < 6) return 1;
    int up = strcmp(argv[2], "up") == 0;
    double secs = atof(argv[3]);
    int nstreams = atoi(argv[4]), dstport = atoi(argv[5]);
    int socksport = argc > 6 ? atoi(argv[6]) : 0;
    if (nstreams < 1 || nstreams > 1024) return 1;
    signal(SIGPIPE, SIG_IGN);
    char *buf = malloc(BULK_BUF);
    memset(buf, 'y', BULK_BUF);
    struct stream *ss = calloc(nstreams, sizeof *ss);
    for (int i = 0; i < nstreams; i++)
        stream_open(&ss[i], up, (uint64_t)(secs * 1e6), dstport, socksport);

    int ep = epoll_create1(0);
    double cpu0 = cpu_seconds(), t0 = now(), end = t0 + secs, giveup = end + 60;
    for (int i = 0; i < nstreams; i++) {
        if (write_full(ss[i].fd, ss[i].hdr, HDR_LEN) < 0) die("write header");
        fcntl(ss[i].fd, F_SETFL, O_NONBLOCK);
        stream_watch(ep, &ss[i], EPOLL_CTL_ADD, up ? EPOLLOUT : EPOLLIN);
    }
    int left = nstreams, sending = up ? nstreams : 0;
    struct epoll_event evs[64];
    while (left > 0) {
        double t = now();
        if (t > giveup) {
            fprintf(stderr, "loadgen: bulk transfer not finished 60 s after its end\n");
            exit(2);
        }
        if (sending && t >= end) {
            for (int i = 0; i < nstreams; i++)
                if (ss[i].phase == B_SEND) stream_finish_upload(ep, &ss[i]);
            sending = 0;
        }
        int wait_ms = sending ? (int)((end - t) * 1e3) + 1 : 1000;
        int n = epoll_wait(ep, evs, 64, wait_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++)
            left -= stream_step(ep, evs[i].data.ptr, buf);
    }
    double t1 = now(), cpu1 = cpu_seconds();
    uint64_t total = 0;
    for (int i = 0; i < nstreams; i++) {
        total += ss[i].bytes;
        close(ss[i].fd);
    }
    printf("%llu %.6f %.6f\n", (unsigned long long)total, t1 - t0, cpu1 - cpu0);
    return 0;
}

/* One stream of exactly BYTES to ('up') or from ('down') bulkd at DSTPORT,
 * blocking reads and writes of up to 1 MiB, one thread, connecting straight
 * to 127.0.0.1:DSTPORT: under Dante's socksify, libdsocks takes that
 * connect() through the proxy (and with GSS-API wraps what we write and
 * unwraps what we read, all inside these calls: its cost is this process's
 * CPU). Prints: bytes seconds cpu_seconds, like bulk. The clock runs from
 * the header sent to the target's byte count received (up) or EOF (down). */
static int cmd_transfer(int argc, char **argv)
{
    if (argc < 5) return 1;
    int up = strcmp(argv[2], "up") == 0;
    uint64_t want = strtoull(argv[3], NULL, 10);
    int dstport = atoi(argv[4]);
    signal(SIGPIPE, SIG_IGN);
    char *buf = malloc(BULK_BUF);
    if (!buf) die("malloc");
    memset(buf, 'y', BULK_BUF);
    int fd = connect_blocking(dstport);
    unsigned char hdr[HDR_LEN] = {up ? 'U' : 'N'};
    memcpy(hdr + 8, &want, 8);
    double cpu0 = cpu_seconds(), t0 = now();
    if (write_full(fd, hdr, HDR_LEN) < 0) die("write header");
    uint64_t done = 0;
    if (up) {
        while (done < want) {
            size_t n = want - done < BULK_BUF ? want - done : BULK_BUF;
            if (write_full(fd, buf, n) < 0) die("upload");
            done += n;
        }
        shutdown(fd, SHUT_WR);
        uint64_t confirmed;
        if (read_full(fd, &confirmed, 8) < 0) die("upload count");
        if (confirmed != want) {
            fprintf(stderr, "loadgen: sent %llu bytes, target got %llu\n",
                    (unsigned long long)want, (unsigned long long)confirmed);
            exit(2);
        }
    } else {
        for (;;) {
            ssize_t r = read(fd, buf, BULK_BUF);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) die("download");
            if (r == 0) break;
            done += r;
        }
        if (done != want) {
            fprintf(stderr, "loadgen: asked for %llu bytes, got %llu\n",
                    (unsigned long long)want, (unsigned long long)done);
            exit(2);
        }
    }
    double t1 = now(), cpu1 = cpu_seconds();
    close(fd);
    printf("%llu %.6f %.6f\n", (unsigned long long)done, t1 - t0, cpu1 - cpu0);
    return 0;
}

/* ---- echo server -------------------------------------------------------- */

struct econn { int fd; int len, off; long echoed; char buf[4096]; };

__attribute__((noreturn)) static void cmd_echo(int argc, char **argv)
{
    long close_after = argc > 2 ? atol(argv[2]) : 0;
    server_setup();
    int lfd = listen_loopback();
    fcntl(lfd, F_SETFL, O_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct econn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (int k = 0; k < 256; k++) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    c = malloc(sizeof *c);
                    c->fd = fd; c->len = c->off = 0; c->echoed = 0;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            int close_it = 0;
            if (c->len > c->off) {          /* pending echo: wait for EPOLLOUT */
                ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
                if (w < 0 && errno != EAGAIN) close_it = 1;
                else if (w > 0) { c->off += w; c->echoed += w; }
            } else {
                ssize_t r = read(c->fd, c->buf, sizeof c->buf);
                if (r == 0 || (r < 0 && errno != EAGAIN)) close_it = 1;
                else if (r > 0) {
                    c->len = r; c->off = 0;
                    ssize_t w = write(c->fd, c->buf, r);
                    if (w < 0 && errno != EAGAIN) close_it = 1;
                    else if (w > 0) { c->off = w; c->echoed += w; }
                }
            }
            /* Echo-and-close: this side closes first, so TIME_WAIT lands on
             * this listening port, not on anyone's ephemeral ports. */
            if (close_after && c->echoed >= close_after) close_it = 1;
            if (close_it) {
                close(c->fd);
                free(c);
                continue;
            }
            if (c->off >= c->len) c->off = c->len = 0;
            struct epoll_event e = {.events = c->len ? EPOLLOUT : EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
        }
    }
}

/* ---- SOCKS5 sessions ---------------------------------------------------- */

enum { S_FREE, S_CONNECTING, S_GREET, S_REPLY, S_REPLY4, S_ECHO, S_EOF, S_HELD };

struct sess {
    int fd, state, got;
    double start;
    unsigned char buf[300];
};

static int g_ep, g_dstport, g_socksport, g_socks4, g_hold, g_wait_eof;
static long g_errors;
static const char PAYLOAD[16] = "0123456789abcdef";

static void sess_watch(struct sess *s, int op, uint32_t events)
{
    struct epoll_event e = {.events = events, .data.ptr = s};
    if (epoll_ctl(g_ep, op, s->fd, &e) < 0) die("epoll_ctl");
}

static int sess_start(struct sess *s)
{
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) die("socket");
    s->start = now();
    s->got = 0;
    s->state = S_CONNECTING;
    struct sockaddr_in sa = loopback(g_socksport ? g_socksport : g_dstport);
    if (connect(s->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->state = S_FREE;
        return -1;
    }
    sess_watch(s, EPOLL_CTL_ADD, EPOLLOUT);
    return 0;
}

static void sess_fail(struct sess *s)
{
    g_errors++;
    close(s->fd);
    s->state = S_FREE;
}

static int send_small(struct sess *s, const void *p, int n)
{
    return write(s->fd, p, n) == n ? 0 : -1;
}

/* Read until `want` bytes are in s->buf; 1 = complete, 0 = wait, -1 = error. */
static int read_until(struct sess *s, int want)
{
    ssize_t r = read(s->fd, s->buf + s->got, want - s->got);
    if (r < 0 && errno == EAGAIN) return 0;
    if (r <= 0) return -1;
    s->got += r;
    return s->got >= want;
}

/* Advance one session; returns 1 when it completed (closed or held). */
static int sess_step(struct sess *s)
{
    int r, len;
    switch (s->state) {
    case S_CONNECTING: {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { sess_fail(s); return 0; }
        int one = 1;
        setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (g_socksport && g_socks4) {
            /* SOCKS4 CONNECT 127.0.0.1:dstport, empty USERID: one round trip. */
            unsigned char req[9] = {4, 1, g_dstport >> 8, g_dstport & 0xff, 127, 0, 0, 1, 0};
            if (send_small(s, req, sizeof req) < 0) { sess_fail(s); return 0; }
            s->state = S_REPLY4;
        } else if (g_socksport) {
            if (send_small(s, "\x05\x01\x00", 3) < 0) { sess_fail(s); return 0; }
            s->state = S_GREET;
        } else {
            if (send_small(s, PAYLOAD, 16) < 0) { sess_fail(s); return 0; }
            s->state = S_ECHO;
        }
        sess_watch(s, EPOLL_CTL_MOD, EPOLLIN);
        return 0;
    }
    case S_GREET:
        r = read_until(s, 2);
        if (r < 0 || (r == 1 && (s->buf[0] != 5 || s->buf[1] != 0))) { sess_fail(s); return 0; }
        if (r == 0) return 0;
        s->got = 0;
        len = socks_request(s->buf, g_dstport);
        if (send_small(s, s->buf, len) < 0) { sess_fail(s); return 0; }
        s->state = S_REPLY;
        return 0;
    case S_REPLY: {
        /* Nothing follows the reply until we send, so read what is there. */
        ssize_t n = read(s->fd, s->buf + s->got, sizeof s->buf - s->got);
        if (n < 0 && errno == EAGAIN) return 0;
        if (n <= 0) { sess_fail(s); return 0; }
        s->got += n;
        if (s->got < 5) return 0;
        len = socks_reply_len(s->buf);
        if (len < 0 || s->buf[1] != 0) { sess_fail(s); return 0; }
        if (s->got < len) return 0;
        s->got = 0;
        if (send_small(s, PAYLOAD, 16) < 0) { sess_fail(s); return 0; }
        s->state = S_ECHO;
        return 0;
    }
    case S_REPLY4:
        r = read_until(s, 8);
        if (r < 0 || (r == 1 && s->buf[1] != 90)) { sess_fail(s); return 0; }
        if (r == 0) return 0;
        s->got = 0;
        if (send_small(s, PAYLOAD, 16) < 0) { sess_fail(s); return 0; }
        s->state = S_ECHO;
        return 0;
    case S_ECHO:
        r = read_until(s, 16);
        if (r < 0 || (r == 1 && memcmp(s->buf, PAYLOAD, 16) != 0)) { sess_fail(s); return 0; }
        if (r == 0) return 0;
        if (g_hold) {
            s->state = S_HELD;
            sess_watch(s, EPOLL_CTL_MOD, 0);  /* idle: nothing expected */
            return 1;
        }
        if (g_wait_eof) {
            s->state = S_EOF;
            s->got = 0;
            return 0;
        }
        close(s->fd);
        s->state = S_FREE;
        return 1;
    case S_EOF: {
        char c;
        ssize_t n = read(s->fd, &c, 1);
        if (n < 0 && errno == EAGAIN) return 0;
        if (n != 0) { sess_fail(s); return 0; }  /* data after the echo, or error */
        close(s->fd);
        s->state = S_FREE;
        return 1;
    }
    }
    return 0;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* n < limit, where limit 0 means no limit. */
static int below(long n, long limit)
{
    return limit == 0 || n < limit;
}

/* Closed-loop: CONC sessions in flight for SECS seconds, or until COUNT
 * sessions have been started and have ended (COUNT 0: no count bound).
 * "eof": after the echo, wait for the target's EOF (passed on by the proxy),
 * then close; "close": close right after the echo. A session's latency runs
 * from socket() to close(). Prints: sessions seconds p50_ms p99_ms errors cpu_s */
static int cmd_sessions(int argc, char **argv)
{
    if (argc < 7) return 1;
    double secs = atof(argv[2]);
    long max_count = atol(argv[3]);
    int conc = atoi(argv[4]);
    g_wait_eof = strcmp(argv[5], "eof") == 0;
    g_dstport = atoi(argv[6]);
    g_socksport = argc > 7 ? socks_port(argv[7], &g_socks4) : 0;
    signal(SIGPIPE, SIG_IGN);
    g_ep = epoll_create1(0);
    struct sess *ss = calloc(conc, sizeof *ss);
    size_t cap = 1 << 16, count = 0;
    float *lat = malloc(cap * sizeof *lat);
    double cpu0 = cpu_seconds(), t0 = now(), end = t0 + secs, t1;
    long max_errors = 1000, started = 0;
    /* Every started session ends counted or as an error. */
    for (int i = 0; i < conc && below(started, max_count); i++, started++)
        if (sess_start(&ss[i]) < 0) g_errors++;
    struct epoll_event evs[256];
    while ((t1 = now()) < end && g_errors < max_errors &&
           below((long)count + g_errors, max_count)) {
        int n = epoll_wait(g_ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct sess *s = evs[i].data.ptr;
            if (sess_step(s)) {
                if (count == cap) {
                    cap *= 2;
                    lat = realloc(lat, cap * sizeof *lat);
                    if (!lat) die("realloc");
                }
                lat[count++] = (now() - s->start) * 1e3;
            }
        }
        /* Completed or failed sessions are restarted (bounded by `end`). */
        for (int i = 0; i < conc && below(started, max_count); i++)
            if (ss[i].state == S_FREE && now() < end) {
                started++;
                if (sess_start(&ss[i]) < 0) g_errors++;
            }
    }
    t1 = now();
    double cpu1 = cpu_seconds();
    qsort(lat, count, sizeof *lat, cmp_float);
    double p50 = count ? lat[count / 2] : 0, p99 = count ? lat[(size_t)(count * 0.99)] : 0;
    printf("%zu %.6f %.4f %.4f %ld %.6f\n", count, t1 - t0, p50, p99, g_errors, cpu1 - cpu0);
    return 0;
}

/* Open N sessions (CONC handshakes at a time; SOCKS5, or SOCKS4 with
 * 4:SOCKSPORT), keep them open and idle, print "ready OPEN ERRORS", and
 * close them all when stdin says anything or closes (or after 600 s). */
static int cmd_hold(int argc, char **argv)
{
    if (argc < 5) return 1;
    int total = atoi(argv[2]), conc = atoi(argv[3]);
    g_dstport = atoi(argv[4]);
    g_socksport = argc > 5 ? socks_port(argv[5], &g_socks4) : 0;
    g_hold = 1;
    signal(SIGPIPE, SIG_IGN);
    g_ep = epoll_create1(0);
    struct sess *ss = calloc(total, sizeof *ss);
    int started = 0, done = 0, inflight = 0;
    double deadline = now() + 120;
    struct epoll_event evs[256];
    while (done + g_errors < total && now() < deadline && g_errors < 100) {
        while (inflight < conc && started < total) {
            if (sess_start(&ss[started]) < 0) g_errors++;
            else inflight++;
            started++;
        }
        int n = epoll_wait(g_ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct sess *s = evs[i].data.ptr;
            if (sess_step(s)) { done++; inflight--; }
            else if (s->state == S_FREE) inflight--;
        }
    }
    printf("ready %d %ld\n", done, g_errors);
    fflush(stdout);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    poll(&p, 1, 600 * 1000);
    for (int i = 0; i < total; i++)
        if (ss[i].state != S_FREE) close(ss[i].fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "echo") == 0) cmd_echo(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "bulkd") == 0) cmd_bulkd();
    if (argc >= 2 && strcmp(argv[1], "bulk") == 0) return cmd_bulk(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "transfer") == 0) return cmd_transfer(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "sessions") == 0) return cmd_sessions(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "hold") == 0) return cmd_hold(argc, argv);
    fprintf(stderr, "usage: loadgen echo|bulkd|bulk|transfer|sessions|hold ...\n");
    return 1;
}
