/*
 * loadgen -- a milter load generator that plays the MTA the way Postfix does.
 *
 *   loadgen [options] TARGET
 *   TARGET: inet:HOST:PORT | inet:PORT@HOST | HOST:PORT | unix:/PATH | /PATH
 *
 * Every message is: option negotiation (protocol 6, all actions, all protocol
 * bits offered, like Postfix 3.7), CONNECT, HELO, MAIL, 2 x RCPT, DATA, 10
 * headers, end of headers, the body in 65535-byte chunks, end of message; the
 * connection ends as Postfix 3.7 ends it: ABORT, ABORT, QUIT (and a later
 * message on the same connection starts with ABORT). Macro packets (D) carry
 * Postfix's default macro lists (milter_*_macros) with the values Postfix 3.7
 * sends for a plain SMTP session, at the points where Postfix sends them: before
 * CONNECT, HELO, MAIL, RCPT and DATA even when the filter skips that event,
 * before each header, end of headers and body chunk only when that event is
 * sent, and before end of message. What the filter negotiated is honoured:
 * skipped events (SMFIP_NO*) are not sent, and no reply is awaited where the
 * filter said it sends none (SMFIP_NR_*). Everything up to the next command
 * that awaits a reply is written in one write(2).
 *
 * Every reply is checked: a known code, a sane length, "continue" for every
 * event before end of message, and at end of message an SMFIR_ADDHEADER of
 * X-Bench (the bench filters add "X-Bench: 1"; -H changes the name, -H ''
 * turns the check off) before the final reply.
 *
 * By default each connection carries one message, as Postfix opens one milter
 * connection per SMTP session; -m N sends N messages per connection.
 *
 * Counting: -n N sends N messages; -d S runs for S seconds after a warm-up of
 * -w S seconds and counts only messages completed inside that window.  With
 * -d the program prints "WINDOW start" and "WINDOW end" on stdout (flushed)
 * when the window opens and closes, so a driver can sample the filter's CPU
 * time at exactly those moments.  It then finishes the messages in flight
 * (not counted), sends QUIT and prints the result, and a machine-readable line:
 *   RESULT messages=.. seconds=.. rate=.. p50_ms=.. p90_ms=.. p99_ms=..
 *          max_ms=.. errors=.. loadgen_cpu_us=..
 * Latency of a message: from connect() (first message of a connection) or
 * from the ABORT that starts it (later messages) to the final reply to end of
 * message.  Exit status 0, or 1 if any error happened (listed on stderr).
 *
 * ACKs: by default a read that leaves part of a reply outstanding is
 * acknowledged at once (TCP_QUICKACK), so that a filter writing its reply in
 * several small packets without TCP_NODELAY (libmilter) is measured rather
 * than the 40 ms delayed-ACK wait it would get from Postfix; -D keeps the
 * kernel's delayed ACKs, as a real MTA has them.
 *
 * Build: gcc -O2 -Wall -o loadgen loadgen.c -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* ------------------------------------------------------------------ protocol */

#define SMFIP_NOCONNECT 0x1
#define SMFIP_NOHELO 0x2
#define SMFIP_NOMAIL 0x4
#define SMFIP_NORCPT 0x8
#define SMFIP_NOBODY 0x10
#define SMFIP_NOHDRS 0x20
#define SMFIP_NOEOH 0x40
#define SMFIP_NR_HDR 0x80
#define SMFIP_NOUNKNOWN 0x100
#define SMFIP_NODATA 0x200
#define SMFIP_SKIP 0x400
#define SMFIP_RCPT_REJ 0x800
#define SMFIP_NR_CONN 0x1000
#define SMFIP_NR_HELO 0x2000
#define SMFIP_NR_MAIL 0x4000
#define SMFIP_NR_RCPT 0x8000
#define SMFIP_NR_DATA 0x10000
#define SMFIP_NR_UNKN 0x20000
#define SMFIP_NR_EOH 0x40000
#define SMFIP_NR_BODY 0x80000
#define SMFIP_HDR_LEADSPC 0x100000

/* What Postfix 3.7 offers with milter_protocol = 6. */
#define OFFER_VERSION 6
#define OFFER_ACTIONS 0x1FF
#define OFFER_PROTOCOL 0x1FFFFF
#define CHUNK 65535
#define MAX_REPLY (1 << 20) /* a sane upper bound for one reply packet */

/* ------------------------------------------------------------------ options */

static const char *target;
static int opt_conns = 1, opt_threads = 1, opt_per_conn = 1, opt_quiet = 0;
static long opt_messages = 0;
static double opt_duration = 0, opt_warmup = 0, opt_timeout = 30;
static size_t opt_body = 4096;
static const char *opt_header = "X-Bench";
static int opt_sources = -1;
static int opt_quickack = 1;

static struct sockaddr_storage dst;
static socklen_t dstlen;
static int dst_family;

/* ------------------------------------------------------------------ shared state */

static atomic_long claimed;      /* messages started (count mode) */
static atomic_int stop_new;      /* no new messages from now on */
static atomic_int measuring;     /* completed messages are counted */
static atomic_long errors_total;
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
#define MAX_ERRKINDS 16
static char err_text[MAX_ERRKINDS][160];
static long err_count[MAX_ERRKINDS];
static int err_kinds;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report_error(const char *fmt, ...) {
    char buf[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    atomic_fetch_add(&errors_total, 1);
    pthread_mutex_lock(&err_lock);
    int i;
    for (i = 0; i < err_kinds; i++)
        if (strcmp(err_text[i], buf) == 0) break;
    if (i == err_kinds && err_kinds < MAX_ERRKINDS) {
        snprintf(err_text[i], sizeof err_text[i], "%s", buf);
        err_kinds++;
    }
    if (i < err_kinds) err_count[i]++;
    pthread_mutex_unlock(&err_lock);
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

/* ------------------------------------------------------------------ byte buffers */

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

static void buf_need(buf_t *b, size_t more) {
    if (b->len + more <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("out of memory");
    b->cap = cap;
}

static void buf_add(buf_t *b, const void *data, size_t n) {
    buf_need(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_u32(buf_t *b, uint32_t v) {
    uint32_t n = htonl(v);
    buf_add(b, &n, 4);
}

static void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s) + 1); }

/* A packet: length, code, payload. */
static void packet(buf_t *out, char code, const buf_t *payload) {
    buf_u32(out, (uint32_t)(1 + (payload ? payload->len : 0)));
    buf_add(out, &code, 1);
    if (payload && payload->len) buf_add(out, payload->p, payload->len);
}

/* A macro packet: D, the command letter, name/value pairs (NULL-terminated list). */
static void macros(buf_t *out, char cmd, const char *const *pairs) {
    buf_t pl = {0};
    buf_add(&pl, &cmd, 1);
    for (; pairs && pairs[0]; pairs += 2) {
        buf_str(&pl, pairs[0]);
        buf_str(&pl, pairs[1]);
    }
    packet(out, 'D', &pl);
    free(pl.p);
}

/* ------------------------------------------------------------------ the message */

/* Postfix 3.7's default macro lists (milter_connect_macros = j {daemon_name}
 * {daemon_addr} v _; milter_helo_macros = the TLS macros; milter_mail_macros = i
 * {auth_*} {mail_addr} {mail_host} {mail_mailer}; milter_rcpt_macros = i {rcpt_addr}
 * {rcpt_host} {rcpt_mailer}; milter_data/end_of_header/end_of_data_macros = i), with
 * the values Postfix 3.7's smtpd sends for a plain session, as seen on the wire: no
 * TLS macros (an empty D packet before HELO), no queue id before the first accepted
 * recipient, and only the macros that have a value. */
#define QID "4dBnch1Xq9z"
static const char *const M_CONNECT[] = {"j", "mx.bench.test", "{daemon_name}", "mx.bench.test",
                                        "{daemon_addr}", "127.0.0.1", "v", "Postfix 3.7.11",
                                        "_", "client.bench.test [127.0.0.1]", NULL};
static const char *const M_HELO[] = {NULL};
static const char *const M_MAIL[] = {"{mail_addr}", "sender@client.bench.test", "{mail_host}", "[127.0.0.1]:25",
                                     "{mail_mailer}", "smtp", NULL};
static const char *const M_RCPT1[] = {"{rcpt_addr}", "rcpt1@sink.bench.test", "{rcpt_host}", "[127.0.0.1]:25",
                                      "{rcpt_mailer}", "smtp", NULL};
static const char *const M_RCPT2[] = {"i", QID, "{rcpt_addr}", "rcpt2@sink.bench.test", "{rcpt_host}",
                                      "[127.0.0.1]:25", "{rcpt_mailer}", "smtp", NULL};
static const char *const M_QID[] = {"i", QID, NULL};

static const char *const HEADERS[10][2] = {
    {"Received", "from client.bench.test (client.bench.test [127.0.0.1])\n\tby mx.bench.test (Postfix) "
                 "with ESMTP id " QID "\n\tfor <rcpt1@sink.bench.test>; Tue, 25 Nov 2025 12:00:00 +0000 (UTC)"},
    {"From", "Bench Sender <sender@client.bench.test>"},
    {"To", "<rcpt1@sink.bench.test>, <rcpt2@sink.bench.test>"},
    {"Subject", "milter benchmark message"},
    {"Date", "Tue, 25 Nov 2025 12:00:00 +0000"},
    {"Message-ID", "<bench.0001@client.bench.test>"},
    {"MIME-Version", "1.0"},
    {"Content-Type", "text/plain; charset=us-ascii"},
    {"Content-Transfer-Encoding", "7bit"},
    {"X-Mailer", "pytclmilter loadgen"},
};

enum { WAIT_NONE = 0, WAIT_REPLY = 1, WAIT_EOM = 2 };

typedef struct {
    buf_t data;   /* bytes to write */
    int wait;     /* what we wait for after writing it */
    int cmd;      /* command whose reply we wait for */
    int skip_to;  /* on SMFIR_SKIP (body): continue at this segment */
} seg_t;

typedef struct {
    seg_t *seg;
    int n;
} script_t;

/* One compiled variant of the message for one negotiated protocol word. */
typedef struct {
    uint32_t protocol;
    script_t first; /* first message of a connection: CONNECT, HELO, then the message */
    script_t next;  /* a later message on the same connection: from MAIL on */
} plan_t;

static pthread_mutex_t plan_lock = PTHREAD_MUTEX_INITIALIZER;
static plan_t *plans[8];
static int nplans;
static unsigned char *body;
static buf_t quit_pkt, optneg_pkt;

typedef struct {
    char cmd;
    const char *const *mac;
    buf_t payload;
    uint32_t skip, nr; /* skip bit, no-reply bit (0: always replied) */
    int content;       /* a message content event: Postfix sends its macros only if it sends the event */
} item_t;

static void item(item_t *it, char cmd, const char *const *mac, uint32_t skip, uint32_t nr) {
    memset(it, 0, sizeof *it);
    it->cmd = cmd;
    it->mac = mac;
    it->skip = skip;
    it->nr = nr;
}

static void seg_close(script_t *s, buf_t *cur, int wait, int cmd) {
    s->seg = realloc(s->seg, sizeof(seg_t) * (s->n + 1));
    seg_t *g = &s->seg[s->n++];
    g->data = *cur;
    g->wait = wait;
    g->cmd = cmd;
    g->skip_to = -1;
    memset(cur, 0, sizeof *cur);
}

static void compile(script_t *s, int first, uint32_t proto) {
    int with_connect = first;
    item_t items[64];
    int n = 0;
    buf_t *pl;
    if (with_connect) {
        item(&items[n], 'C', M_CONNECT, SMFIP_NOCONNECT, SMFIP_NR_CONN);
        pl = &items[n++].payload;
        buf_str(pl, "client.bench.test");
        buf_add(pl, "4", 1);
        uint16_t port = htons(40000);
        buf_add(pl, &port, 2);
        buf_str(pl, "127.0.0.1");
        item(&items[n], 'H', M_HELO, SMFIP_NOHELO, SMFIP_NR_HELO);
        buf_str(&items[n++].payload, "client.bench.test");
    }
    item(&items[n], 'M', M_MAIL, SMFIP_NOMAIL, SMFIP_NR_MAIL);
    pl = &items[n++].payload;
    buf_str(pl, "<sender@client.bench.test>");
    char size[32];
    snprintf(size, sizeof size, "SIZE=%zu", opt_body + 1000);
    buf_str(pl, size);
    item(&items[n], 'R', M_RCPT1, SMFIP_NORCPT, SMFIP_NR_RCPT);
    buf_str(&items[n++].payload, "<rcpt1@sink.bench.test>");
    item(&items[n], 'R', M_RCPT2, SMFIP_NORCPT, SMFIP_NR_RCPT);
    buf_str(&items[n++].payload, "<rcpt2@sink.bench.test>");
    item(&items[n++], 'T', M_QID, SMFIP_NODATA, SMFIP_NR_DATA);
    for (int h = 0; h < 10; h++) {
        item(&items[n], 'L', M_QID, SMFIP_NOHDRS, SMFIP_NR_HDR);
        items[n].content = 1;
        pl = &items[n++].payload;
        buf_str(pl, HEADERS[h][0]);
        /* Postfix strips the space after the colon unless SMFIP_HDR_LEADSPC. */
        if (proto & SMFIP_HDR_LEADSPC) buf_add(pl, " ", 1);
        buf_str(pl, HEADERS[h][1]);
    }
    item(&items[n], 'N', M_QID, SMFIP_NOEOH, SMFIP_NR_EOH);
    items[n++].content = 1;
    int body_items = 0;
    for (size_t off = 0; off < opt_body; off += CHUNK) {
        size_t len = opt_body - off < CHUNK ? opt_body - off : CHUNK;
        if (n >= 60) die("body too large for one script (max %d chunks)", 60 - 20);
        item(&items[n], 'B', M_QID, SMFIP_NOBODY, SMFIP_NR_BODY);
        buf_add(&items[n].payload, body + off, len);
        items[n++].content = 1;
        body_items++;
    }
    item(&items[n++], 'E', M_QID, 0, 0);

    memset(s, 0, sizeof *s);
    buf_t cur = {0};
    /* A later message on the same connection: Postfix aborts the previous transaction first. */
    if (!first) packet(&cur, 'A', NULL);
    for (int i = 0; i < n; i++) {
        item_t *it = &items[i];
        int sent = !(it->skip && (proto & it->skip));
        if (sent || !it->content) macros(&cur, it->cmd, it->mac);
        if (sent) {
            packet(&cur, it->cmd, &it->payload);
            if (it->cmd == 'E')
                seg_close(s, &cur, WAIT_EOM, 'E');
            else if (!(it->nr && (proto & it->nr)))
                seg_close(s, &cur, WAIT_REPLY, it->cmd);
        }
        free(it->payload.p);
    }
    /* SMFIR_SKIP after a body chunk: what remains is the end-of-message packet
     * with its macros (Postfix sends no D packet for the skipped chunks). */
    buf_t eom = {0};
    macros(&eom, 'E', M_QID);
    packet(&eom, 'E', NULL);
    int eom_only = s->n;
    seg_close(s, &eom, WAIT_EOM, 'E');
    for (int i = 0; i < eom_only; i++)
        if (s->seg[i].cmd == 'B') s->seg[i].skip_to = eom_only;
    s->n = eom_only; /* the extra segment sits past the end, reached only by skip_to */
}

static plan_t *plan_for(uint32_t proto) {
    pthread_mutex_lock(&plan_lock);
    for (int i = 0; i < nplans; i++)
        if (plans[i]->protocol == proto) {
            pthread_mutex_unlock(&plan_lock);
            return plans[i];
        }
    if (nplans == 8) die("too many different negotiation results");
    plan_t *p = calloc(1, sizeof *p);
    p->protocol = proto;
    compile(&p->first, 1, proto);
    compile(&p->next, 0, proto);
    plans[nplans++] = p;
    pthread_mutex_unlock(&plan_lock);
    return p;
}

/* ------------------------------------------------------------------ connections */

enum { C_IDLE, C_CONNECTING, C_OPTNEG, C_MSG };

typedef struct conn {
    int fd, state, msgs_on_conn, index;
    uint32_t gen; /* bumped per socket, so stale epoll events are recognised */
    plan_t *plan;
    script_t *script;
    int segi;
    const unsigned char *wptr;
    size_t wleft;
    int want_out;
    int waiting; /* WAIT_* for the current segment once written */
    int saw_header;
    int need_ack; /* part of a reply came, the rest is awaited: acknowledge at once */
    double started, last_io;
    buf_t in;
    size_t in_off;
    struct worker *w;
} conn_t;

typedef struct worker {
    int id, epfd, nconns, open;
    conn_t *conns;
    uint64_t *lat; /* nanoseconds */
    size_t nlat, caplat;
    long done, started_msgs;
    unsigned src;
    pthread_t th;
} worker_t;

static int claim(void) {
    if (atomic_load(&stop_new)) return 0;
    if (opt_messages > 0) {
        long c = atomic_fetch_add(&claimed, 1);
        if (c >= opt_messages) return 0;
    }
    return 1;
}

static uint64_t tag(const conn_t *c) { return ((uint64_t)c->gen << 32) | (uint32_t)c->index; }

static void set_events(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u64 = tag(c)};
    if (epoll_ctl(c->w->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    c->want_out = out;
}

static void conn_close(conn_t *c) {
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
        c->w->open--;
    }
    c->state = C_IDLE;
    c->in.len = 0;
    c->in_off = 0;
}

static void conn_fail(conn_t *c, const char *fmt, ...) {
    char buf[140];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    report_error("%s", buf);
    conn_close(c);
}

/* Queue bytes and try to write them at once. Returns -1 if the connection failed. */
static int send_bytes(conn_t *c, const unsigned char *p, size_t n) {
    c->wptr = p;
    c->wleft = n;
    while (c->wleft) {
        ssize_t k = write(c->fd, c->wptr, c->wleft);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                if (!c->want_out) set_events(c, 1);
                return 0;
            }
            conn_fail(c, "write: %s", strerror(errno));
            return -1;
        }
        c->wptr += k;
        c->wleft -= k;
    }
    if (c->want_out) set_events(c, 0);
    return 0;
}

static int start_segment(conn_t *c) {
    seg_t *g = &c->script->seg[c->segi];
    c->waiting = g->wait;
    c->need_ack = 0;
    return send_bytes(c, g->data.p, g->data.len);
}

static int conn_open(conn_t *c);

static void start_message(conn_t *c) {
    c->script = &c->plan->next;
    c->segi = 0;
    c->saw_header = 0;
    c->started = now();
    c->w->started_msgs++;
    start_segment(c);
}

/* The message ended with its final reply: count it, then the next one or QUIT. */
static void message_done(conn_t *c) {
    worker_t *w = c->w;
    if (atomic_load(&measuring)) {
        if (w->nlat == w->caplat) {
            w->caplat = w->caplat ? w->caplat * 2 : 4096;
            w->lat = realloc(w->lat, w->caplat * sizeof *w->lat);
            if (!w->lat) die("out of memory");
        }
        w->lat[w->nlat++] = (uint64_t)((now() - c->started) * 1e9);
        w->done++;
    }
    c->msgs_on_conn++;
    if (c->msgs_on_conn < opt_per_conn && claim()) {
        start_message(c);
        return;
    }
    /* Like Postfix: QUIT, then close without waiting for the filter. */
    if (write(c->fd, quit_pkt.p, quit_pkt.len) < 0) { /* best effort */
    }
    conn_close(c);
    if (claim()) conn_open(c);
}

static int conn_open(conn_t *c) {
    worker_t *w = c->w;
    int fd = socket(dst_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    if (dst_family == AF_INET) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (opt_sources > 1) {
            /* Spread connections over several loopback source addresses so that
             * TIME_WAIT entries do not exhaust the ephemeral ports. */
            struct sockaddr_in src = {.sin_family = AF_INET};
            src.sin_addr.s_addr = htonl(0x7f000001 + 0x100 * (w->src++ % opt_sources));
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind: %s", strerror(errno));
        }
    }
    c->fd = fd;
    c->gen++;
    c->state = C_CONNECTING;
    c->msgs_on_conn = 0;
    c->in.len = c->in_off = 0;
    c->want_out = 1;
    c->started = c->last_io = now();
    w->open++;
    w->started_msgs++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = tag(c)};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&dst, dstlen) < 0 && errno != EINPROGRESS) {
        conn_fail(c, "connect: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int valid_final(char code) {
    return code == 'c' || code == 'a' || code == 'r' || code == 't' || code == 'd' || code == 'y';
}

static int is_modification(char code) { return code != 0 && strchr("him+-2ebq", code) != NULL; }

/* One reply packet from the filter. Returns -1 if the connection was closed. */
static int on_packet(conn_t *c, char code, const unsigned char *pl, uint32_t len) {
    if (c->state == C_OPTNEG) {
        if (code != 'O' || len < 12) return conn_fail(c, "bad negotiation reply '%c' (%u bytes)", code, len), -1;
        uint32_t v[3];
        memcpy(v, pl, 12);
        uint32_t version = ntohl(v[0]), actions = ntohl(v[1]), proto = ntohl(v[2]);
        if (version < 2 || version > OFFER_VERSION)
            return conn_fail(c, "negotiation: version %u", version), -1;
        if (actions & ~OFFER_ACTIONS) return conn_fail(c, "negotiation: actions 0x%x not offered", actions), -1;
        if (proto & ~OFFER_PROTOCOL) return conn_fail(c, "negotiation: protocol 0x%x not offered", proto), -1;
        if (opt_header[0] && !(actions & 0x1))
            return conn_fail(c, "negotiation: the filter did not ask for SMFIF_ADDHDRS"), -1;
        c->plan = plan_for(proto);
        c->script = &c->plan->first;
        c->segi = 0;
        c->saw_header = 0;
        c->state = C_MSG;
        return start_segment(c);
    }
    if (c->state != C_MSG || c->wleft)
        return conn_fail(c, "reply '%c' while none was awaited", code), -1;
    seg_t *g = &c->script->seg[c->segi];
    if (code == 'p') { /* progress: keep waiting */
        c->need_ack = 1;
        return 0;
    }
    if (c->waiting == WAIT_REPLY) {
        if (code == 's' && g->cmd == 'B' && (c->plan->protocol & SMFIP_SKIP)) {
            c->segi = g->skip_to;
            return start_segment(c);
        }
        if (code != 'c') {
            if (valid_final(code))
                return conn_fail(c, "verdict '%c' at command '%c' (expected continue)", code, g->cmd), -1;
            return conn_fail(c, "invalid reply '%c' to command '%c'", code, g->cmd), -1;
        }
        c->segi++;
        return start_segment(c);
    }
    if (c->waiting == WAIT_EOM) {
        if (is_modification(code)) {
            c->need_ack = 1;
            if (code == 'h' && opt_header[0]) {
                size_t hl = strlen(opt_header);
                if (len > hl + 1 && memcmp(pl, opt_header, hl + 1) == 0) {
                    const unsigned char *val = pl + hl + 1;
                    size_t vlen = len - hl - 1;
                    if (vlen >= 2 && val[vlen - 1] == 0 && memcmp(val, "1", 2) == 0) c->saw_header = 1;
                }
            }
            return 0;
        }
        if (!valid_final(code)) return conn_fail(c, "invalid reply '%c' at end of message", code), -1;
        if (code != 'c' && code != 'a') return conn_fail(c, "verdict '%c' at end of message", code), -1;
        if (opt_header[0] && !c->saw_header) return conn_fail(c, "no %s: 1 header at end of message", opt_header), -1;
        c->waiting = WAIT_NONE;
        message_done(c);
        return c->fd < 0 ? -1 : 0;
    }
    return conn_fail(c, "reply '%c' while none was awaited", code), -1;
}

static void on_readable(conn_t *c) {
    buf_t *b = &c->in;
    uint32_t gen = c->gen;
    for (;;) {
        buf_need(b, 65536);
        ssize_t k = read(c->fd, b->p + b->len, b->cap - b->len);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            conn_fail(c, "read: %s", strerror(errno));
            return;
        }
        if (k == 0) {
            conn_fail(c, "the filter closed the connection (state %d, segment %d)", c->state, c->segi);
            return;
        }
        b->len += k;
        c->last_io = now();

        while (b->len - c->in_off >= 5) {
            uint32_t len;
            memcpy(&len, b->p + c->in_off, 4);
            len = ntohl(len);
            if (len == 0 || len > MAX_REPLY) {
                conn_fail(c, "bad reply length %u", len);
                return;
            }
            if (b->len - c->in_off < 4 + (size_t)len) break;
            char code = (char)b->p[c->in_off + 4];
            const unsigned char *pl = b->p + c->in_off + 5;
            c->in_off += 4 + len;
            if (on_packet(c, code, pl, len - 1) < 0) return;
            if (c->fd < 0 || c->gen != gen) return; /* closed, or closed and reopened */
        }
        if (opt_quickack && dst_family == AF_INET && (c->need_ack || b->len > c->in_off)) {
            /* Still waiting after this read, i.e. part of a reply came: acknowledge it at once
             * (otherwise the next write carries the ACK). A filter that writes its
             * end-of-message actions and its final reply as separate small packets without
             * TCP_NODELAY (libmilter) would else wait for our delayed ACK, up to 40 ms. */
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
        }
        if (c->in_off == b->len) b->len = c->in_off = 0;
        else if (c->in_off > 65536) {
            memmove(b->p, b->p + c->in_off, b->len - c->in_off);
            b->len -= c->in_off;
            c->in_off = 0;
        }
        if ((size_t)k < 65536) break;
    }
}

static void on_writable(conn_t *c) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            conn_fail(c, "connect: %s", strerror(err));
            return;
        }
        c->state = C_OPTNEG;
        c->last_io = now();
        send_bytes(c, optneg_pkt.p, optneg_pkt.len);
        return;
    }
    if (c->wleft) send_bytes(c, c->wptr, c->wleft);
    else set_events(c, 0);
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) die("epoll_create1: %s", strerror(errno));
    for (int i = 0; i < w->nconns; i++) {
        w->conns[i].fd = -1;
        w->conns[i].index = i;
        w->conns[i].w = w;
        if (claim()) conn_open(&w->conns[i]);
    }
    struct epoll_event evs[256];
    double last_sweep = now();
    while (w->open > 0) {
        int n = epoll_wait(w->epfd, evs, 256, 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = &w->conns[(uint32_t)evs[i].data.u64];
            uint32_t gen = (uint32_t)(evs[i].data.u64 >> 32);
            if (c->fd < 0 || c->gen != gen) continue; /* an event of a socket already closed */
            if (evs[i].events & (EPOLLOUT | EPOLLERR) && (c->state == C_CONNECTING || c->wleft)) {
                on_writable(c);
                if (c->fd < 0 || c->gen != gen) continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR) && c->state != C_CONNECTING) on_readable(c);
        }
        double t = now();
        if (t - last_sweep > 0.5) {
            last_sweep = t;
            for (int i = 0; i < w->nconns; i++) {
                conn_t *c = &w->conns[i];
                if (c->fd >= 0 && t - c->last_io > opt_timeout)
                    conn_fail(c, "timeout: no reply for %.0f s (state %d, segment %d)", opt_timeout, c->state, c->segi);
            }
        }
    }
    close(w->epfd);
    return NULL;
}

/* ------------------------------------------------------------------ setup and report */

static void parse_target(const char *t) {
    char host[256], port[32];
    const char *s = t;
    memset(&dst, 0, sizeof dst);
    if (strncmp(s, "unix:", 5) == 0 || strncmp(s, "local:", 6) == 0 || s[0] == '/') {
        const char *path = s[0] == '/' ? s : strchr(s, ':') + 1;
        struct sockaddr_un *un = (struct sockaddr_un *)&dst;
        if (strlen(path) >= sizeof un->sun_path) die("unix socket path too long: %s", path);
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, path);
        dstlen = sizeof *un;
        dst_family = AF_UNIX;
        return;
    }
    if (strncmp(s, "inet:", 5) == 0) s += 5;
    const char *at = strchr(s, '@');
    if (at) { /* libmilter style PORT@HOST */
        snprintf(port, sizeof port, "%.*s", (int)(at - s), s);
        snprintf(host, sizeof host, "%s", at + 1);
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) die("bad target %s: want inet:HOST:PORT, inet:PORT@HOST or unix:/PATH", t);
        snprintf(host, sizeof host, "%.*s", (int)(colon - s), s);
        snprintf(port, sizeof port, "%s", colon + 1);
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host[0] ? host : "127.0.0.1", port, &hints, &res);
    if (rc) die("%s: %s", t, gai_strerror(rc));
    memcpy(&dst, res->ai_addr, res->ai_addrlen);
    dstlen = res->ai_addrlen;
    dst_family = AF_INET;
    freeaddrinfo(res);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint64_t *v, size_t n, double p) {
    if (!n) return 0;
    size_t rank = (size_t)(p / 100.0 * n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return v[rank - 1] / 1e6;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen [-c CONNS] (-n MESSAGES | -d SECONDS [-w WARMUP]) [-m PER_CONN] [-b BODY_BYTES]\n"
            "               [-t THREADS] [-T TIMEOUT] [-H HEADER] [-S SOURCES] [-D] [-q] TARGET\n"
            "  TARGET       inet:HOST:PORT, inet:PORT@HOST, HOST:PORT, unix:/PATH or /PATH\n"
            "  -c CONNS     concurrent milter connections (default 1)\n"
            "  -n MESSAGES  send this many messages in total\n"
            "  -d SECONDS   or: measure for this long (after -w SECONDS of warm-up, default 0)\n"
            "  -m PER_CONN  messages per connection (default 1, as Postfix: one per SMTP session)\n"
            "  -b BYTES     body size (default 4096; sent in 65535-byte chunks unless skipped)\n"
            "  -t THREADS   worker threads, each with its own epoll and share of connections (default 1)\n"
            "  -T SECONDS   give up on a connection after this long without a reply (default 30)\n"
            "  -H NAME      header the filter must add with value 1 at end of message (default X-Bench;\n"
            "               '' to check nothing)\n"
            "  -S N         spread TCP connections over N loopback source addresses (default 8 for 127.x)\n"
            "  -D           delayed ACKs as a plain MTA socket has them (Postfix); by default every read\n"
            "               is acknowledged at once (TCP_QUICKACK), so a filter that sends its reply in\n"
            "               several small packets without TCP_NODELAY is measured, not its ACK wait\n"
            "  -q           print only the RESULT line\n");
    exit(2);
}

int main(int argc, char **argv) {
    int ch;
    while ((ch = getopt(argc, argv, "c:n:d:w:m:b:t:T:H:S:Dqh")) != -1) {
        switch (ch) {
        case 'c': opt_conns = atoi(optarg); break;
        case 'n': opt_messages = atol(optarg); break;
        case 'd': opt_duration = atof(optarg); break;
        case 'w': opt_warmup = atof(optarg); break;
        case 'm': opt_per_conn = atoi(optarg); break;
        case 'b': opt_body = (size_t)atol(optarg); break;
        case 't': opt_threads = atoi(optarg); break;
        case 'T': opt_timeout = atof(optarg); break;
        case 'H': opt_header = optarg; break;
        case 'S': opt_sources = atoi(optarg); break;
        case 'q': opt_quiet = 1; break;
        case 'D': opt_quickack = 0; break;
        default: usage();
        }
    }
    if (optind != argc - 1) usage();
    if (opt_conns < 1 || opt_threads < 1 || opt_per_conn < 1) usage();
    if ((opt_messages > 0) == (opt_duration > 0)) die("give exactly one of -n MESSAGES and -d SECONDS");
    if (opt_threads > opt_conns) opt_threads = opt_conns;
    target = argv[optind];
    parse_target(target);
    if (opt_sources < 0) {
        struct sockaddr_in *in = (struct sockaddr_in *)&dst;
        opt_sources = (dst_family == AF_INET && (ntohl(in->sin_addr.s_addr) >> 24) == 127) ? 8 : 1;
    }
    if (opt_body < 1) opt_body = 1;
    if (opt_body > (size_t)CHUNK * 40) die("body larger than %d bytes", CHUNK * 40);

    /* Body: 76-character text lines with CRLF. */
    body = malloc(opt_body);
    for (size_t i = 0; i < opt_body;) {
        for (int k = 0; k < 76 && i < opt_body; k++, i++) body[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[(i / 78 + k) % 36];
        if (i < opt_body) body[i++] = '\r';
        if (i < opt_body) body[i++] = '\n';
    }
    buf_t pl = {0};
    buf_u32(&pl, OFFER_VERSION);
    buf_u32(&pl, OFFER_ACTIONS);
    buf_u32(&pl, OFFER_PROTOCOL);
    packet(&optneg_pkt, 'O', &pl);
    free(pl.p);
    /* What Postfix 3.7 sends after the last message of a session: abort (cleanup's and
     * smtpd's), then quit. */
    packet(&quit_pkt, 'A', NULL);
    packet(&quit_pkt, 'A', NULL);
    packet(&quit_pkt, 'Q', NULL);

    worker_t *ws = calloc(opt_threads, sizeof *ws);
    conn_t *conns = calloc(opt_conns, sizeof *conns);
    int given = 0;
    for (int i = 0; i < opt_threads; i++) {
        ws[i].id = i;
        ws[i].nconns = opt_conns / opt_threads + (i < opt_conns % opt_threads);
        ws[i].conns = conns + given;
        ws[i].src = i;
        given += ws[i].nconns;
    }

    double cpu0 = cpu_seconds(), t0 = now(), t_start, t_end;
    double cpu_start = cpu0, cpu_end;
    atomic_store(&measuring, opt_duration > 0 && opt_warmup > 0 ? 0 : 1);
    for (int i = 0; i < opt_threads; i++) pthread_create(&ws[i].th, NULL, worker_main, &ws[i]);
    if (opt_duration > 0) {
        if (opt_warmup > 0) {
            struct timespec ts = {(time_t)opt_warmup, (long)((opt_warmup - (time_t)opt_warmup) * 1e9)};
            nanosleep(&ts, NULL);
        }
        atomic_store(&measuring, 1);
        t_start = now();
        cpu_start = cpu_seconds();
        printf("WINDOW start\n");
        fflush(stdout);
        double end = t_start + opt_duration;
        for (double t; (t = now()) < end;) {
            double left = end - t;
            struct timespec ts = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
            nanosleep(&ts, NULL);
        }
        atomic_store(&measuring, 0);
        atomic_store(&stop_new, 1);
        t_end = now();
        cpu_end = cpu_seconds();
        printf("WINDOW end\n");
        fflush(stdout);
        for (int i = 0; i < opt_threads; i++) pthread_join(ws[i].th, NULL);
    } else {
        t_start = t0;
        for (int i = 0; i < opt_threads; i++) pthread_join(ws[i].th, NULL);
        t_end = now();
        cpu_end = cpu_seconds();
    }

    size_t total = 0;
    for (int i = 0; i < opt_threads; i++) total += ws[i].nlat;
    uint64_t *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < opt_threads; i++) {
        memcpy(all + k, ws[i].lat, ws[i].nlat * sizeof *all);
        k += ws[i].nlat;
    }
    qsort(all, total, sizeof *all, cmp_u64);
    double secs = t_end - t_start, rate = secs > 0 ? total / secs : 0;
    double lg_cpu = total ? (cpu_end - cpu_start) / total * 1e6 : 0;
    long errs = atomic_load(&errors_total);
    if (!opt_quiet) {
        printf("target %s, %d connection(s), %d message(s) per connection, body %zu bytes, %d thread(s), %s ACKs\n",
               target, opt_conns, opt_per_conn, opt_body, opt_threads, opt_quickack ? "quick" : "delayed");
        for (int i = 0; i < nplans; i++)
            printf("negotiated protocol 0x%06x: %d write(s) per first message, %d per later message\n",
                   plans[i]->protocol, plans[i]->first.n, plans[i]->next.n);
        printf("messages: %zu in %.3f s = %.1f messages/s\n", total, secs, rate);
        printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", pct(all, total, 50), pct(all, total, 90),
               pct(all, total, 99), total ? all[total - 1] / 1e6 : 0.0);
        printf("load generator CPU: %.1f us per message\n", lg_cpu);
        printf("errors: %ld\n", errs);
    }
    printf("RESULT messages=%zu seconds=%.4f rate=%.2f p50_ms=%.4f p90_ms=%.4f p99_ms=%.4f max_ms=%.4f errors=%ld "
           "loadgen_cpu_us=%.2f\n",
           total, secs, rate, pct(all, total, 50), pct(all, total, 90), pct(all, total, 99),
           total ? all[total - 1] / 1e6 : 0.0, errs, lg_cpu);
    fflush(stdout);
    for (int i = 0; i < err_kinds; i++) fprintf(stderr, "loadgen: error x%ld: %s\n", err_count[i], err_text[i]);
    return errs ? 1 : 0;
}
