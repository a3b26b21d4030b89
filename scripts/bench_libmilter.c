/*
 * bench_libmilter -- the benchmark workload of scripts/bench as a C libmilter filter.
 *
 *   bench_libmilter [-b] [-B BACKLOG] CONNSPEC      e.g. inet:8899@127.0.0.1
 *
 * Registers connect, envfrom, envrcpt, header and eom; every callback answers
 * continue and eom adds "X-Bench: 1". The negotiate callback asks for what
 * pytclmilter asks for with the same callbacks: skip the events nobody
 * listens to (SMFIP_NO*), no reply to headers (SMFIP_NR_HDR), so the four
 * filters of the bench see the same traffic. -b also registers a body
 * callback (then the body is sent).
 *
 * Build: gcc -O2 -o bench_libmilter bench_libmilter.c -lmilter -lpthread
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int want_body;

static sfsistat b_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2,
                            unsigned long f3, unsigned long *pf0, unsigned long *pf1, unsigned long *pf2,
                            unsigned long *pf3) {
    (void)f2;
    (void)f3;
    unsigned long want = SMFIP_NOHELO | SMFIP_NODATA | SMFIP_NOUNKNOWN | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_SKIP;
    if (!want_body) want |= SMFIP_NOBODY;
    *pf0 = f0 & SMFIF_ADDHDRS;
    *pf1 = f1 & want;
    /* Remember per connection whether headers get no reply (the pointer is a flag, never freed). */
    smfi_setpriv(ctx, (*pf1 & SMFIP_NR_HDR) ? (void *)1 : NULL);
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat b_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr) {
    (void)ctx;
    (void)host;
    (void)addr;
    return SMFIS_CONTINUE;
}

static sfsistat b_envfrom(SMFICTX *ctx, char **argv) {
    (void)ctx;
    (void)argv;
    return SMFIS_CONTINUE;
}

static sfsistat b_envrcpt(SMFICTX *ctx, char **argv) {
    (void)ctx;
    (void)argv;
    return SMFIS_CONTINUE;
}

static sfsistat b_header(SMFICTX *ctx, char *name, char *value) {
    (void)name;
    (void)value;
    /* With SMFIP_NR_HDR negotiated the MTA waits for no reply: say so. */
    return smfi_getpriv(ctx) != NULL ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

static sfsistat b_body(SMFICTX *ctx, unsigned char *chunk, size_t len) {
    (void)ctx;
    (void)chunk;
    (void)len;
    return SMFIS_CONTINUE;
}

static sfsistat b_eom(SMFICTX *ctx) {
    if (smfi_addheader(ctx, "X-Bench", "1") != MI_SUCCESS) return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    int ch, backlog = 1024;
    while ((ch = getopt(argc, argv, "bB:")) != -1) {
        if (ch == 'b') want_body = 1;
        else if (ch == 'B') backlog = atoi(optarg);
        else {
            fprintf(stderr, "usage: bench_libmilter [-b] [-B BACKLOG] CONNSPEC\n");
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: bench_libmilter [-b] [-B BACKLOG] CONNSPEC\n");
        return 2;
    }
    struct smfiDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = "BenchLibmilter";
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_flags = SMFIF_ADDHDRS;
    desc.xxfi_connect = b_connect;
    desc.xxfi_envfrom = b_envfrom;
    desc.xxfi_envrcpt = b_envrcpt;
    desc.xxfi_header = b_header;
    desc.xxfi_body = want_body ? b_body : NULL;
    desc.xxfi_eom = b_eom;
    desc.xxfi_negotiate = b_negotiate;
    if (smfi_setconn(argv[optind]) != MI_SUCCESS || smfi_setbacklog(backlog) != MI_SUCCESS ||
        smfi_settimeout(600) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "bench_libmilter: setup failed\n");
        return 1;
    }
    if (smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "bench_libmilter: cannot listen on %s\n", argv[optind]);
        return 1;
    }
    printf("bench_libmilter: listening on %s\n", argv[optind]);
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
