/* Wire bytes <-> the bytes Tcl 8.6 keeps a string's text in, one pass over the data each way.
 *
 * The rule is the README's "Bytes and text", as tcl/strings.py states it; its pure-Python
 * wire_to_tcl_python / tcl_to_wire_python give the same bytes for any input (tests compare them)
 * and serve where this module is not built. Python's codecs do the same work in several passes
 * and take their error path for every byte that is not UTF-8 (half the bytes of a binary part,
 * most of those of CP1251 text); here such a byte costs a few instructions, and no branch that
 * the processor would have to guess (docs/benchmarks.md, "8-bit bodies through a Tcl script").
 *
 * wire_to_tcl: valid UTF-8 (Python's strict rules: no overlongs, no surrogates, nothing beyond
 *   U+10FFFF) is kept; NUL becomes C0 80 (Tcl's NUL); any other byte b becomes the CESU-8 form of
 *   U+DC80+b, ED B2|B3 xx, which Tcl keeps through any string operation.
 * tcl_to_wire: the inverse, for any bytes: C0 80 -> NUL; a CESU-8 surrogate pair
 *   (ED A0..AF xx ED B0..BF xx, what Tcl writes for a character beyond U+FFFF when it rebuilds a
 *   string) -> that character in UTF-8; ED B2|B3 xx -> the byte; everything else kept.
 * Both return their argument itself when nothing changes (ASCII text, UTF-8 text).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HIGH_BITS 0x8080808080808080ULL
#define LOW_BITS 0x0101010101010101ULL

/* The high bit of each byte of the word (8 bytes in memory order) that is zero or has its high
 * bit set; exact up to and including the first such byte, which is what plain_bytes reads. */
static inline uint64_t
stop_bits(uint64_t v)
{
    return (v | ((v - LOW_BITS) & ~v)) & HIGH_BITS;
}

/* How many bytes of the word come before the first that has a bit in these stop bits (not 0). */
static inline Py_ssize_t
plain_bytes(uint64_t stops)
{
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_ctzll(stops) >> 3;
#else
    (void)stops;
    return 0;  /* (the byte-wise way then takes each) */
#endif
}

static inline int
is_cont(unsigned char c)
{
    return (c & 0xC0) == 0x80;
}

/* The length of the valid UTF-8 character of 2 to 4 bytes at p, or 0 if none starts there. */
static inline Py_ssize_t
utf8_char(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    Py_ssize_t left = end - p;

    if (c < 0xC2 || c > 0xF4)  /* continuation bytes, overlong C0/C1, beyond U+10FFFF */
        return 0;
    if (c < 0xE0)
        return left >= 2 && is_cont(p[1]) ? 2 : 0;
    if (c < 0xF0) {
        if (c == 0xE0)
            lo = 0xA0;  /* overlong below */
        else if (c == 0xED)
            hi = 0x9F;  /* U+D800..U+DFFF are not UTF-8 */
        return left >= 3 && p[1] >= lo && p[1] <= hi && is_cont(p[2]) ? 3 : 0;
    }
    if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    return left >= 4 && p[1] >= lo && p[1] <= hi && is_cont(p[2]) && is_cont(p[3]) ? 4 : 0;
}

/* What wire_to_tcl makes of a byte by itself: its bytes (the first ESC_LEN[b] of ESC_WORD[b]) */
static uint32_t ESC_WORD[256];
static unsigned char ESC_LEN[256];
/* A lead byte's character length and the range of its second byte (LEAD_LO > LEAD_HI: no lead). */
static unsigned char LEAD_LEN[256], LEAD_LO[256], LEAD_HI[256];

static void
make_tables(void)
{
    for (int b = 0; b < 256; b++) {
        unsigned char out[4] = {(unsigned char)b, 0, 0, 0};
        unsigned char len = 1;
        if (b == 0) {
            out[0] = 0xC0, out[1] = 0x80, len = 2;
        }
        else if (b >= 0x80) {
            out[0] = 0xED, out[1] = b < 0xC0 ? 0xB2 : 0xB3, out[2] = 0x80 | (b & 0x3F), len = 3;
        }
        memcpy(&ESC_WORD[b], out, 4);
        ESC_LEN[b] = len;
        LEAD_LO[b] = 0xFF, LEAD_HI[b] = 0x00, LEAD_LEN[b] = 1;
        if (b >= 0xC2 && b <= 0xF4) {
            LEAD_LEN[b] = b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
            LEAD_LO[b] = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
            LEAD_HI[b] = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        }
    }
}

/* No valid UTF-8 character of 2 to 4 bytes begins in these 8 bytes (in memory order), the byte
 * after them being next: none of C0..FF is followed by one of 80..BF. (False does not mean one
 * does: C0, C1 and F5..FF begin none.) */
static inline int
no_character_starts(uint64_t v, unsigned char next)
{
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t lead = v & (v << 1) & HIGH_BITS, cont = v & ~(v << 1) & HIGH_BITS;
    return ((lead << 8) & cont) == 0 && !((lead >> 63) && is_cont(next));
#else
    (void)v, (void)next;
    return 0;
#endif
}

/* One byte, the same work whatever it is, so that the processor need not guess (random bytes
 * would defeat its guesses) and steps do not wait on each other: whether a byte is kept depends
 * only on the bytes from it on (a lead byte that begins a valid character) and on how many
 * continuation bytes of such a character are still to come (rest). The step stores 4 bytes, the
 * byte or its own form, and moves the output on by the length of that: 4 bytes of input must be
 * left, and room for 3 output bytes for each. */
static inline void
wire_step(const unsigned char **pp, unsigned char **op, unsigned *restp)
{
    const unsigned char *p = *pp;
    unsigned c = p[0], len = LEAD_LEN[c], rest = *restp;
    uint32_t lead = (p[1] >= LEAD_LO[c]) & (p[1] <= LEAD_HI[c]) & ((len < 3) | is_cont(p[2]))
                    & ((len < 4) | is_cont(p[3]));
    uint32_t inside = rest != 0;
    uint32_t keep = -(lead | inside);  /* all ones for a byte of a valid character */
    uint32_t word = (c & keep) | (ESC_WORD[c] & ~keep);
    memcpy(*op, &word, 4);
    *op += (1 & keep) | (ESC_LEN[c] & ~keep);
    *restp = ((len - 1) & -lead) | ((rest - inside) & ~-lead);
    *pp = p + 1;
}

/* Where the bytes from p on stop being valid UTF-8 without NUL: what wire_to_tcl keeps. */
static const unsigned char *
wire_plain_end(const unsigned char *p, const unsigned char *end)
{
    Py_ssize_t k;
    uint64_t v;

    while (p < end) {
        while (end - p >= 8) {
            memcpy(&v, p, 8);
            if ((v = stop_bits(v)) != 0) {
                p += plain_bytes(v);
                break;
            }
            p += 8;
        }
        if (p == end)
            break;
        if (*p != 0 && *p < 0x80) {
            p++;
            continue;
        }
        if (*p == 0 || (k = utf8_char(p, end)) == 0)
            break;
        p += k;
    }
    return p;
}

static PyObject *
wire_to_tcl(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out, *o;
    Py_ssize_t n, kept, k;
    PyObject *result;
    uint64_t v;
    unsigned rest = 0;

    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "wire_to_tcl() needs bytes, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    src = (const unsigned char *)PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    end = src + n;
    p = wire_plain_end(src, end);
    if (p == end) {
        Py_INCREF(arg);
        return arg;
    }
    kept = p - src;
    if (n - kept > (PY_SSIZE_T_MAX - kept) / 3)
        return PyErr_NoMemory();
    result = PyBytes_FromStringAndSize(NULL, kept + 3 * (n - kept));  /* at most 3 for 1 */
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, src, kept);
    o = out + kept;
    /* 8 bytes at a time: ASCII text is copied; 8-bit text (Latin-1, CP1251) or random bytes in
     * which no UTF-8 character can begin are each given their own form, one step a byte; other
     * words take the exact way below, byte by byte. */
    while (end - p >= 16) {
        if (rest == 0) {
            memcpy(&v, p, 8);
            if (stop_bits(v) == 0) {
                memcpy(o, &v, 8);
                o += 8;
                p += 8;
                continue;
            }
            if (no_character_starts(v, p[8])) {
                for (int i = 0; i < 8; i++) {
                    memcpy(o, &ESC_WORD[p[i]], 4);  /* (there is room: 3 for each byte left) */
                    o += ESC_LEN[p[i]];
                }
                p += 8;
                continue;
            }
        }
        for (int i = 0; i < 8; i++)
            wire_step(&p, &o, &rest);
    }
    while (end - p >= 4)
        wire_step(&p, &o, &rest);
    for (; p < end; p++) {  /* the last 3 bytes */
        unsigned char c = *p;
        if (rest) {
            *o++ = c;
            rest--;
        }
        else if ((k = c < 0x80 ? (c != 0) : utf8_char(p, end)) != 0) {
            *o++ = c;
            rest = (unsigned)k - 1;
        }
        else {
            memcpy(o, &ESC_WORD[c], ESC_LEN[c]);
            o += ESC_LEN[c];
        }
    }
    if (_PyBytes_Resize(&result, o - out) < 0)
        return NULL;
    return result;
}

/* The number of bytes of the Tcl form at p that tcl_to_wire rewrites (0: the byte is kept), and
 * what they become in *byte (C0 80, ED B2|B3 xx) or *cp (a surrogate pair). */
static inline int
tcl_escape(const unsigned char *p, const unsigned char *end, unsigned char *byte, uint32_t *cp)
{
    Py_ssize_t left = end - p;

    if (p[0] == 0xC0) {
        if (left >= 2 && p[1] == 0x80) {
            *byte = 0;
            return 2;
        }
        return 0;
    }
    if (p[0] != 0xED || left < 3 || !is_cont(p[2]))
        return 0;
    if (p[1] >= 0xA0 && p[1] <= 0xAF) {
        if (left >= 6 && p[3] == 0xED && p[4] >= 0xB0 && p[4] <= 0xBF && is_cont(p[5])) {
            uint32_t high = 0xD000 | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
            uint32_t low = 0xD000 | ((p[4] & 0x3F) << 6) | (p[5] & 0x3F);
            *cp = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return 6;
        }
        return 0;
    }
    if (p[1] == 0xB2 || p[1] == 0xB3) {
        *byte = (unsigned char)(p[2] + (p[1] - 0xB2) * 0x40);
        return 3;
    }
    return 0;
}

/* Where the first byte that tcl_to_wire rewrites is, from p on (end if none). */
static const unsigned char *
tcl_plain_end(const unsigned char *p, const unsigned char *end)
{
    unsigned char byte;
    uint32_t cp;
    uint64_t v;

    while (p < end) {
        while (end - p >= 8) {
            memcpy(&v, p, 8);
            if ((v &= HIGH_BITS) != 0) {
                p += plain_bytes(v);
                break;
            }
            p += 8;
        }
        if (p == end)
            break;
        if ((*p == 0xC0 || *p == 0xED) && tcl_escape(p, end, &byte, &cp))
            break;
        p++;
    }
    return p;
}

static PyObject *
tcl_to_wire(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out, *o, byte = 0;
    uint32_t cp = 0;
    Py_ssize_t n, kept;
    PyObject *result;
    uint64_t v;
    int k;

    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "tcl_to_wire() needs bytes, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    src = (const unsigned char *)PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    end = src + n;
    p = tcl_plain_end(src, end);
    if (p == end) {
        Py_INCREF(arg);
        return arg;
    }
    kept = p - src;
    result = PyBytes_FromStringAndSize(NULL, n);  /* every rewrite makes fewer bytes */
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, src, kept);
    o = out + kept;
    while (p < end) {
        while (end - p >= 8) {  /* a run of ASCII text goes 8 bytes at a time */
            memcpy(&v, p, 8);
            memcpy(o, &v, 8);  /* (there is room: the output is never longer than the input) */
            if ((v &= HIGH_BITS) != 0) {
                k = (int)plain_bytes(v);
                o += k;
                p += k;
                break;
            }
            o += 8;
            p += 8;
        }
        /* A run of escaped bytes (8-bit text): the step is always 3, so the processor can read
         * ahead while it checks that the run goes on. */
        while (end - p >= 3 && p[0] == 0xED && (p[1] & 0xFE) == 0xB2 && is_cont(p[2])) {
            *o++ = (unsigned char)(p[2] + ((p[1] & 1) << 6));
            p += 3;
        }
        if (p == end)
            break;
        if ((*p != 0xC0 && *p != 0xED) || (k = tcl_escape(p, end, &byte, &cp)) == 0) {
            *o++ = *p++;
        }
        else if (k < 6) {
            *o++ = byte;
            p += k;
        }
        else {
            *o++ = (unsigned char)(0xF0 | (cp >> 18));
            *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
            *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            *o++ = (unsigned char)(0x80 | (cp & 0x3F));
            p += k;
        }
    }
    if (_PyBytes_Resize(&result, o - out) < 0)
        return NULL;
    return result;
}

/* The text of bytes that are ASCII without NUL, which Tcl takes as they are; None for any other
 * bytes. One pass that copies while it checks and stops at the first other byte: no second pass
 * over a block the cache no longer holds, and no exception (with its copy of the block) for a
 * block that is not ASCII. */
static PyObject *
ascii_text(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out;
    PyObject *result;
    uint64_t v;

    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "ascii_text() needs bytes, not %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    src = (const unsigned char *)PyBytes_AS_STRING(arg);
    end = src + PyBytes_GET_SIZE(arg);
    if (end > src && (*src == 0 || *src >= 0x80))  /* an 8-bit block usually shows it at once */
        Py_RETURN_NONE;
    result = PyUnicode_New(end - src, 127);
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyUnicode_DATA(result);
    p = src;
    for (; end - p >= 32; p += 32, out += 32) {  /* four words a step: as fast as Python's decoder */
        uint64_t w[4];
        memcpy(w, p, 32);
        if ((stop_bits(w[0]) | stop_bits(w[1]) | stop_bits(w[2]) | stop_bits(w[3])) != 0)
            goto other;
        memcpy(out, w, 32);
    }
    for (; end - p >= 8; p += 8, out += 8) {
        memcpy(&v, p, 8);
        if (stop_bits(v) != 0)
            goto other;
        memcpy(out, &v, 8);
    }
    for (; p < end; p++, out++) {
        if (*p == 0 || *p >= 0x80)
            goto other;
        *out = *p;
    }
    return result;
other:
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ascii_text", ascii_text, METH_O,
     "The text of bytes that are ASCII without NUL; None for any other bytes."},
    {"wire_to_tcl", wire_to_tcl, METH_O,
     "The bytes Tcl keeps for the text of these wire bytes (encoding convertfrom identity)."},
    {"tcl_to_wire", tcl_to_wire, METH_O,
     "Wire bytes for the text Tcl keeps in these bytes (encoding convertto identity)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pytclmilter.tcl._tclbytes",
    "Wire bytes <-> the bytes Tcl keeps text in, in one pass (see tcl/strings.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tclbytes(void)
{
    make_tables();
    return PyModule_Create(&module);
}
