/*
 * nullmilter -- the physical limit for any milter: the conversation itself, and nothing else.
 *
 *   nullmilter [-b] inet:PORT@HOST | inet:HOST:PORT
 *
 * A single-threaded epoll program with canned replies. It negotiates exactly what pytclmilter
 * negotiates for the benchmark script (tclmilter/examples/bench.tcl): every action the MTA
 * offers of the eight of protocol version 6 (SMFIF_ADDHDRS .. SMFIF_CHGFROM, not SETSYMLIST),
 * the events without a callback skipped (HELO, DATA, end of headers, unknown, and the body
 * unless -b), no reply to headers, and SMFIP_SKIP; all of it only where the MTA offers it.
 * It answers "continue" to every command that awaits a reply and, at end of message, writes
 * the action (SMFIR_ADDHEADER "X-Bench: 1") and the final "continue" in one write, as
 * pytclmilter does. Everything one read brings is answered with one write. No state machine,
 * no macros, no log: what it costs per message is what the kernel and the round trips cost.
 *
 * scripts/bench builds it (gcc -O2) and runs it as the filter "null": the limit row.
 *
 * Build: gcc -O2 -Wall -o nullmilter nullmilter.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* What pytclmilter asks for with bench.tcl (protocol/negotiation.py), before masking with the offer. */
#define WANT_ACTIONS 0xFF       /* SMFIF_ADDHDRS .. SMFIF_CHGFROM */
#define WANT_PROTOCOL 0x7D2     /* NOHELO NOBODY NOEOH NR_HDR NOUNKNOWN NODATA SKIP */
#define WANT_PROTOCOL_BODY 0x7C2 /* the same with a body callback (-b): the body is sent */
#define SMFIP_NR_HDR 0x80

/* Per connection: the frame being read. Payloads are skipped, except option negotiation's 12 bytes. */
typedef struct {
    int fd;
    unsigned char head[17]; /* length, code and, for 'O', version/actions/protocol */
    unsigned hlen;          /* bytes of head read so far */
    unsigned want;          /* bytes of head this frame needs */
    uint32_t skip;          /* payload bytes still to skip */
    uint32_t protocol;      /* negotiated */
} conn_t;

static uint32_t want_protocol = WANT_PROTOCOL;
static unsigned char inbuf[1 << 18];

static void die(const char *what) {
    perror(what);
    exit(2);
}

static size_t put_frame(unsigned char *out, char code, const void *payload, uint32_t len) {
    uint32_t n = htonl(len + 1);
    memcpy(out, &n, 4);
    out[4] = (unsigned char)code;
    if (len) memcpy(out + 5, payload, len);
    return 5 + len;
}

/* A whole frame was read: append its reply to out; -1 to close the connection. */
static int on_frame(conn_t *c, unsigned char *out, size_t *olen) {
    char code = (char)c->head[4];
    switch (code) {
    case 'O': {
        uint32_t v[3] = {6, 0, 0}, offer[3];
        memcpy(offer, c->head + 5, 12);
        uint32_t version = ntohl(offer[0]), actions = ntohl(offer[1]), proto = ntohl(offer[2]);
        if (version < 2) return -1;
        c->protocol = want_protocol & proto;
        v[0] = htonl(version < 6 ? version : 6);
        v[1] = htonl(actions & WANT_ACTIONS);
        v[2] = htonl(c->protocol);
        *olen += put_frame(out + *olen, 'O', v, 12);
        return 0;
    }
    case 'E':
        *olen += put_frame(out + *olen, 'h', "X-Bench\0" "1", 10);
        *olen += put_frame(out + *olen, 'c', NULL, 0);
        return 0;
    case 'L':
        if (!(c->protocol & SMFIP_NR_HDR)) *olen += put_frame(out + *olen, 'c', NULL, 0);
        return 0;
    case 'C': case 'H': case 'M': case 'R': case 'T': case 'N': case 'U': case 'B':
        *olen += put_frame(out + *olen, 'c', NULL, 0);
        return 0;
    case 'Q':
        return -1;
    default: /* D (macros), A (abort): no reply */
        return 0;
    }
}

static void conn_close(conn_t *c) {
    close(c->fd);
    free(c);
}

static void on_readable(conn_t *c) {
    ssize_t n = read(c->fd, inbuf, sizeof inbuf);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        conn_close(c);
        return;
    }
    unsigned char out[4096];
    size_t olen = 0, pos = 0;
    int quit = 0;
    while (pos < (size_t)n && !quit) {
        if (c->skip) {
            size_t k = (size_t)n - pos < c->skip ? (size_t)n - pos : c->skip;
            pos += k;
            c->skip -= (uint32_t)k;
        } else {
            while (c->hlen < c->want && pos < (size_t)n) c->head[c->hlen++] = inbuf[pos++];
            if (c->hlen < c->want) break;
            uint32_t len;
            memcpy(&len, c->head, 4);
            len = ntohl(len);
            if (len == 0) {
                quit = 1;
                break;
            }
            if (c->want == 5) {
                /* the header is complete: read 'O''s payload into head, skip any other */
                if (c->head[4] == 'O' && len == 13) {
                    c->want = 17;
                    continue;
                }
                c->skip = len - 1;
            }
            if (c->skip) continue;
        }
        if (c->skip == 0 && c->hlen == c->want) {
            if (on_frame(c, out, &olen) < 0) quit = 1;
            c->hlen = 0;
            c->want = 5;
            if (olen > sizeof out - 64) { /* a long pipeline: flush */
                if (write(c->fd, out, olen) != (ssize_t)olen) quit = 1;
                olen = 0;
            }
        }
    }
    /* Blocking socket, replies of a few bytes: one write(2), never partial in practice. */
    if (olen && write(c->fd, out, olen) != (ssize_t)olen) quit = 1;
    if (quit) conn_close(c);
}

static int listen_on(const char *spec) {
    char host[256] = "127.0.0.1", port[32];
    const char *s = strncmp(spec, "inet:", 5) == 0 ? spec + 5 : spec;
    const char *at = strchr(s, '@');
    if (at) { /* libmilter style PORT@HOST */
        snprintf(port, sizeof port, "%.*s", (int)(at - s), s);
        snprintf(host, sizeof host, "%s", at + 1);
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            fprintf(stderr, "nullmilter: bad address %s (inet:PORT@HOST or inet:HOST:PORT)\n", spec);
            exit(2);
        }
        snprintf(host, sizeof host, "%.*s", (int)(colon - s), s);
        snprintf(port, sizeof port, "%s", colon + 1);
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) {
        fprintf(stderr, "nullmilter: %s: %s\n", spec, gai_strerror(rc));
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Inherited by accepted sockets, as pytclmilter sets it on its listener. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv) {
    int a = 1;
    if (a < argc && strcmp(argv[a], "-b") == 0) {
        want_protocol = WANT_PROTOCOL_BODY;
        a++;
    }
    if (a != argc - 1) {
        fprintf(stderr, "usage: nullmilter [-b] inet:PORT@HOST\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = listen_on(argv[a]);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");
    printf("nullmilter listening on %s\n", argv[a]);
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c) {
                on_readable(c);
                continue;
            }
            for (;;) { /* every connection waiting: accept4 until the queue is empty */
                int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0) break;
                c = calloc(1, sizeof *c);
                c->fd = fd;
                c->want = 5;
                struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0) {
                    close(fd);
                    free(c);
                }
            }
        }
    }
}
