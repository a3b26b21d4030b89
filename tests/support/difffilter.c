/*
 * difffilter.c -- the C libmilter half of tests/test_differential_libmilter.py.
 *
 *   difffilter CONNSPEC INSTRUCTIONS LOG [EVENT ...]
 *
 * Registers every callback but the EVENTs named, and writes one line per callback call to LOG:
 * the callback's name, its arguments and the macros of a fixed list that have a value, each
 * escaped (below). tests/support/difffilter.tcl is the same filter for pytclmilter and writes
 * the same lines; the test compares the two.
 *
 * INSTRUCTIONS is read at every option negotiation (one connection at a time: the test waits
 * for each to end). A line "EVENT STATUS [RCODE [XCODE [MESSAGE]]]" makes that callback answer
 * STATUS (continue, reject, tempfail, accept, discard, skip, noreply), after setreply when RCODE
 * is given; "EVENT#N ..." does so for its Nth call on the connection only. "actions NAME ..."
 * lists what every eom callback does before it answers (see do_action).
 *
 * Escaping: a byte outside 0x21-0x7e, and the backslash, is written \xHH (lowercase hex).
 *
 * It asks for what pytclmilter asks for (docs/protocol.md §4.4), so that both see the same
 * traffic, and does by hand two things pytclmilter does on its own where libmilter would leave
 * the MTA waiting for a reply (DEFERRED_HEADER_VERDICT, NOREPLY_WHERE_THE_MTA_WAITS below): the
 * test's other documented deviations are in tests/test_differential_libmilter.py.
 *
 * Build: gcc -Wall -o difffilter difffilter.c -lmilter -lpthread
 */
#include <libmilter/mfapi.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#define MAX_LINES 64
#define LINE_MAX_LEN 1024
#define LOG_MAX (8 * 65536 + 4096)

static const char *instructions_path;
static FILE *logf;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char instructions[MAX_LINES][LINE_MAX_LEN];
static int n_instructions;

static const char *EVENTS[] = {"negotiate", "connect", "helo", "envfrom", "envrcpt", "data", "unknown",
                               "header", "eoh", "body", "eom", "abort", "close", NULL};
static int calls[13];
static int unregistered[13];

/* The macros every line shows, when they have a value (both forms of `i`: each finds the other). */
static const char *MACROS[] = {"j", "{daemon_name}", "i", "{i}", "{mail_addr}", "{rcpt_addr}", "{tls_version}",
                               "{auth_type}", "{auth_authen}", "{auth_author}", "{auth_ssf}", NULL};

/* A header verdict pytclmilter keeps for the next reply (DEFERRED_HEADER_VERDICT below); 0: none. */
static sfsistat deferred;
static int deferring;

static int event_index(const char *name) {
    for (int i = 0; EVENTS[i] != NULL; i++)
        if (strcmp(EVENTS[i], name) == 0) return i;
    return -1;
}

static void read_instructions(void) {
    FILE *f = fopen(instructions_path, "r");
    n_instructions = 0;
    if (f == NULL) return;
    while (n_instructions < MAX_LINES && fgets(instructions[n_instructions], LINE_MAX_LEN, f) != NULL) {
        instructions[n_instructions][strcspn(instructions[n_instructions], "\n")] = '\0';
        n_instructions++;
    }
    fclose(f);
}

/* The rest of the instruction line for KEY ("envrcpt#2", "envrcpt", "actions"), or NULL. */
static const char *instruction(const char *key) {
    size_t len = strlen(key);
    for (int i = 0; i < n_instructions; i++)
        if (strncmp(instructions[i], key, len) == 0 && instructions[i][len] == ' ') return instructions[i] + len + 1;
    return NULL;
}

/* ---------------------------------------------------------------- the log */

struct line {
    char buf[LOG_MAX];
    size_t len;
};

static void put(struct line *l, const char *s) {
    size_t n = strlen(s);
    if (l->len + n < sizeof l->buf) {
        memcpy(l->buf + l->len, s, n);
        l->len += n;
    }
}

static void put_escaped(struct line *l, const unsigned char *s, size_t n) {
    char hex[5];
    for (size_t i = 0; i < n && l->len + 4 < sizeof l->buf; i++) {
        if (s[i] < 0x21 || s[i] > 0x7e || s[i] == '\\') {
            snprintf(hex, sizeof hex, "\\x%02x", s[i]);
            put(l, hex);
        } else {
            l->buf[l->len++] = (char)s[i];
        }
    }
}

static void arg(struct line *l, const char *s) {
    put(l, " ");
    put_escaped(l, (const unsigned char *)s, strlen(s));
}

static void begin(struct line *l, const char *name) {
    l->len = 0;
    put(l, name);
}

static void finish(struct line *l, SMFICTX *ctx) {
    const char *sep = " |";
    for (int i = 0; MACROS[i] != NULL; i++) {
        const char *v = smfi_getsymval(ctx, (char *)MACROS[i]);
        if (v == NULL || *v == '\0') continue;
        put(l, sep);
        sep = "";
        put(l, " ");
        put(l, MACROS[i]);
        put(l, "=");
        put_escaped(l, (const unsigned char *)v, strlen(v));
    }
    put(l, "\n");
    pthread_mutex_lock(&log_lock);
    fwrite(l->buf, 1, l->len, logf);
    fflush(logf);
    pthread_mutex_unlock(&log_lock);
}

static void log0(SMFICTX *ctx, const char *name) {
    static struct line l;
    begin(&l, name);
    finish(&l, ctx);
}

/* ---------------------------------------------------------------- answers */

static sfsistat status_of(const char *word) {
    static const struct {
        const char *name;
        sfsistat status;
    } names[] = {{"continue", SMFIS_CONTINUE}, {"reject", SMFIS_REJECT},   {"tempfail", SMFIS_TEMPFAIL},
                 {"accept", SMFIS_ACCEPT},     {"discard", SMFIS_DISCARD}, {"skip", SMFIS_SKIP},
                 {"noreply", SMFIS_NOREPLY}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(names[i].name, word) == 0) return names[i].status;
    return SMFIS_CONTINUE;
}

/* What callback NAME answers at this call: its instruction, with setreply done. */
static sfsistat answer(SMFICTX *ctx, const char *name) {
    char key[64], spec[LINE_MAX_LEN];
    int n = ++calls[event_index(name)];
    snprintf(key, sizeof key, "%s#%d", name, n);
    const char *found = instruction(key);
    if (found == NULL) found = instruction(name);
    if (found == NULL) return SMFIS_CONTINUE;
    snprintf(spec, sizeof spec, "%s", found);
    char *rest = spec;
    char *word = strsep(&rest, " ");
    char *rcode = rest != NULL ? strsep(&rest, " ") : NULL;
    char *xcode = rest != NULL ? strsep(&rest, " ") : NULL;
    if (rcode != NULL) smfi_setreply(ctx, rcode, xcode, rest);
    sfsistat status = status_of(word);
    /* NOREPLY_WHERE_THE_MTA_WAITS (docs/protocol.md §4.6, §8): libmilter sends nothing where the
     * MTA waits, which leaves it waiting for its timeout; pytclmilter sends continue. Only headers
     * are negotiated without a reply here. */
    if (status == SMFIS_NOREPLY && strcmp(name, "header") != 0) return SMFIS_CONTINUE;
    return status;
}

/* DEFERRED_HEADER_VERDICT (docs/protocol.md §8, §4.6): under SMFIP_NR_HDR libmilter drops a
 * header callback's verdict; pytclmilter keeps it, runs no more callbacks of the message, and
 * answers it at the next event the MTA waits on. A libmilter filter that asks for NR_HDR does
 * the same by hand, so that the MTA sees the same replies; true while one waits. The test's
 * offers always include NR_HDR, which this filter always asks for. */
static int deferred_pending(void) {
    return deferring;
}

static sfsistat take_deferred(void) {
    deferring = 0;
    return deferred;
}

static void forget_deferred(void) {
    deferring = 0;
}

/* ---------------------------------------------------------------- eom actions */

static void do_action(SMFICTX *ctx, const char *what) {
    if (strcmp(what, "addheader") == 0) smfi_addheader(ctx, "X-Diff", "added value");
    else if (strcmp(what, "insheader") == 0) smfi_insheader(ctx, 1, "X-Diff-Ins", "inserted");
    else if (strcmp(what, "chgheader") == 0) smfi_chgheader(ctx, "Subject", 2, "changed");
    else if (strcmp(what, "delheader") == 0) smfi_chgheader(ctx, "X-Old", 1, "");
    else if (strcmp(what, "addrcpt") == 0) smfi_addrcpt(ctx, "<added@example.net>");
    else if (strcmp(what, "addrcpt_par") == 0) smfi_addrcpt_par(ctx, "<added2@example.net>", "NOTIFY=NEVER");
    else if (strcmp(what, "delrcpt") == 0) smfi_delrcpt(ctx, "<b@example.com>");
    else if (strcmp(what, "chgfrom") == 0) smfi_chgfrom(ctx, "<new@example.net>", NULL);
    else if (strcmp(what, "chgfrom_par") == 0) smfi_chgfrom(ctx, "<new@example.net>", "RET=HDRS");
    else if (strcmp(what, "replacebody") == 0) smfi_replacebody(ctx, (unsigned char *)"new body\r\n", 10);
    else if (strcmp(what, "quarantine") == 0) smfi_quarantine(ctx, "held for review");
    else if (strcmp(what, "progress") == 0) smfi_progress(ctx);
}

static void do_actions(SMFICTX *ctx) {
    const char *list = instruction("actions");
    char copy[LINE_MAX_LEN], *rest = copy, *word;
    if (list == NULL) return;
    snprintf(copy, sizeof copy, "%s", list);
    while ((word = strsep(&rest, " ")) != NULL)
        if (*word != '\0') do_action(ctx, word);
}

/* ---------------------------------------------------------------- callbacks */

static sfsistat f_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
                            unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
    static const unsigned long skip_bits[] = {0, SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT,
                                              SMFIP_NODATA, SMFIP_NOUNKNOWN, SMFIP_NOHDRS, SMFIP_NOEOH,
                                              SMFIP_NOBODY, 0, 0, 0};
    const unsigned long all_nr = SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA |
                                 SMFIP_NR_UNKN | SMFIP_NR_HDR | SMFIP_NR_EOH | SMFIP_NR_BODY;
    static struct line l;
    char num[32];
    (void)f2;
    (void)f3;
    read_instructions();
    memset(calls, 0, sizeof calls);
    forget_deferred();
    begin(&l, "negotiate");
    /* libmilter adds every no-reply bit to the offer it shows (it can answer for the filter) */
    snprintf(num, sizeof num, "0x%lx", f0);
    arg(&l, num);
    snprintf(num, sizeof num, "0x%lx", f1 & ~all_nr);
    arg(&l, num);
    finish(&l, ctx);
    /* What pytclmilter asks for (docs/protocol.md §4.4): every action offered but SETSYMLIST, the
     * skip bit of each event without a callback, no reply to headers, and SKIP. */
    unsigned long want = SMFIP_SKIP | (unregistered[event_index("header")] ? 0 : SMFIP_NR_HDR);
    for (int i = 0; EVENTS[i] != NULL; i++)
        if (unregistered[i]) want |= skip_bits[i];
    *pf0 = f0 & ~(unsigned long)SMFIF_SETSYMLIST;
    *pf1 = f1 & want;
    *pf2 = 0;
    *pf3 = 0;
    return answer(ctx, "negotiate");
}

static sfsistat f_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *sa) {
    static struct line l;
    char text[INET6_ADDRSTRLEN + 108], num[16];
    const char *family = "unknown";
    int port = 0;
    text[0] = '\0';
    if (sa != NULL && sa->sa_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        family = "inet";
        inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
        port = ntohs(in->sin_port);
    } else if (sa != NULL && sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
        family = "inet6";
        inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
        port = ntohs(in6->sin6_port);
    } else if (sa != NULL && sa->sa_family == AF_UNIX) {
        family = "unix";
        snprintf(text, sizeof text, "%s", ((struct sockaddr_un *)sa)->sun_path);
    }
    begin(&l, "connect");
    arg(&l, host);
    arg(&l, family);
    arg(&l, text);
    snprintf(num, sizeof num, "%d", port);
    arg(&l, num);
    finish(&l, ctx);
    return answer(ctx, "connect");
}

static sfsistat f_helo(SMFICTX *ctx, char *name) {
    static struct line l;
    forget_deferred();
    begin(&l, "helo");
    arg(&l, name);
    finish(&l, ctx);
    return answer(ctx, "helo");
}

static sfsistat envelope(SMFICTX *ctx, const char *name, char **argv) {
    static struct line l;
    begin(&l, name);
    for (int i = 0; argv[i] != NULL; i++) arg(&l, argv[i]);
    finish(&l, ctx);
    return answer(ctx, name);
}

static sfsistat f_envfrom(SMFICTX *ctx, char **argv) {
    forget_deferred();
    return envelope(ctx, "envfrom", argv);
}

static sfsistat f_envrcpt(SMFICTX *ctx, char **argv) {
    return envelope(ctx, "envrcpt", argv);
}

static sfsistat f_data(SMFICTX *ctx) {
    log0(ctx, "data");
    return answer(ctx, "data");
}

static sfsistat f_unknown(SMFICTX *ctx, const char *cmd) {
    static struct line l;
    begin(&l, "unknown");
    arg(&l, cmd);
    finish(&l, ctx);
    return answer(ctx, "unknown");
}

static sfsistat f_header(SMFICTX *ctx, char *name, char *value) {
    static struct line l;
    if (deferred_pending()) return SMFIS_NOREPLY;
    begin(&l, "header");
    arg(&l, name);
    arg(&l, value);
    finish(&l, ctx);
    sfsistat status = answer(ctx, "header");
    if (status != SMFIS_CONTINUE && status != SMFIS_NOREPLY && status != SMFIS_SKIP) {
        deferred = status;
        deferring = 1;
    }
    return SMFIS_NOREPLY;
}

static sfsistat f_eoh(SMFICTX *ctx) {
    if (deferred_pending()) return take_deferred();
    log0(ctx, "eoh");
    return answer(ctx, "eoh");
}

static sfsistat f_body(SMFICTX *ctx, unsigned char *chunk, size_t len) {
    static struct line l;
    if (deferred_pending()) return take_deferred();
    begin(&l, "body");
    put(&l, " ");
    put_escaped(&l, chunk, len);
    finish(&l, ctx);
    return answer(ctx, "body");
}

static sfsistat f_eom(SMFICTX *ctx) {
    if (deferred_pending()) return take_deferred();
    log0(ctx, "eom");
    do_actions(ctx);
    return answer(ctx, "eom");
}

static sfsistat f_abort(SMFICTX *ctx) {
    forget_deferred();
    log0(ctx, "abort");
    answer(ctx, "abort");
    return SMFIS_CONTINUE;
}

static sfsistat f_close(SMFICTX *ctx) {
    forget_deferred();
    log0(ctx, "close");
    answer(ctx, "close");
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: difffilter CONNSPEC INSTRUCTIONS LOG [EVENT ...]\n");
        return 64;
    }
    instructions_path = argv[2];
    logf = fopen(argv[3], "a");
    if (logf == NULL) {
        perror(argv[3]);
        return 1;
    }
    for (int i = 4; i < argc; i++) {
        int e = event_index(argv[i]);
        if (e < 0) {
            fprintf(stderr, "difffilter: unknown event %s\n", argv[i]);
            return 64;
        }
        unregistered[e] = 1;
    }
    struct smfiDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = "DiffFilter";
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_flags = SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS |
                      SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR;
    desc.xxfi_negotiate = f_negotiate;
#define REGISTER(field, fn, name) desc.field = unregistered[event_index(name)] ? NULL : fn
    REGISTER(xxfi_connect, f_connect, "connect");
    REGISTER(xxfi_helo, f_helo, "helo");
    REGISTER(xxfi_envfrom, f_envfrom, "envfrom");
    REGISTER(xxfi_envrcpt, f_envrcpt, "envrcpt");
    REGISTER(xxfi_data, f_data, "data");
    REGISTER(xxfi_unknown, f_unknown, "unknown");
    REGISTER(xxfi_header, f_header, "header");
    REGISTER(xxfi_eoh, f_eoh, "eoh");
    REGISTER(xxfi_body, f_body, "body");
    REGISTER(xxfi_eom, f_eom, "eom");
    REGISTER(xxfi_abort, f_abort, "abort");
    REGISTER(xxfi_close, f_close, "close");
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "difffilter: cannot set up %s\n", argv[1]);
        return 1;
    }
    if (smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "difffilter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    printf("difffilter: listening on %s\n", argv[1]);
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
