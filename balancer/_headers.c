/* The header lines that cross the hop, joined in one pass (balancer/hop_headers.py says which and why).

   strip(headers, dropped) -> (lines, held)
     headers  a list of (name, value) pairs of bytes, as the parsers give them
     dropped  a tuple of lower-case names that do not cross
   lines is every other header as "Name: value\r\n", in order, joined; held is [(index in dropped, value)] for
   the headers that did not cross, in order, so the caller can read Host, Connection or Content-Length from them.
   Names compare without regard to ASCII case, as bytes.lower() does; `dropped` is scanned for each header, so
   it is meant for the callers' fixed sets of a dozen names (at most 64).

   In Python (balancer.hop_headers.python_strip, which runs where this is not built) each header costs a
   lower-case copy of its name, a set lookup and a formatted line. Here the name is compared in place and the
   lines are copied once into the bytes returned. With it, forwarded_headers and returned_answer went from 12,089
   to 8,730 instructions per request, and the default balancer's process from 70,353 to 66,999
   (`python -m bench.instructions --functions default`); `python -m bench.compare --base 7d34ae1` (both on one
   core) gave 2.3 % less CPU per request. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_DROPPED 64  /* the callers' fixed sets; a Connection header's own list goes through Python */

static int lower(int byte) {
    return byte >= 'A' && byte <= 'Z' ? byte + ('a' - 'A') : byte;
}

/* The index in `dropped` (lower-case names) of the name (`length` bytes at `name`, any case), or -1. */
static Py_ssize_t find(const unsigned char *name, Py_ssize_t length, PyObject *dropped) {
    for (Py_ssize_t index = 0; index < PyTuple_GET_SIZE(dropped); index++) {
        PyObject *candidate = PyTuple_GET_ITEM(dropped, index);
        if (PyBytes_GET_SIZE(candidate) != length) {
            continue;
        }
        const unsigned char *folded = (const unsigned char *)PyBytes_AS_STRING(candidate);
        Py_ssize_t at = 0;
        while (at < length && lower(name[at]) == folded[at]) {
            at++;
        }
        if (at == length) {
            return index;
        }
    }
    return -1;
}

static PyObject *strip(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "strip(headers: list, dropped: tuple)");
        return NULL;
    }
    PyObject *headers = args[0], *dropped = args[1];
    Py_ssize_t dropped_count = PyTuple_GET_SIZE(dropped);
    if (dropped_count > MAX_DROPPED) {
        PyErr_Format(PyExc_ValueError, "at most %d dropped names, got %zd", MAX_DROPPED, dropped_count);
        return NULL;
    }
    for (Py_ssize_t index = 0; index < dropped_count; index++) {
        PyObject *name = PyTuple_GET_ITEM(dropped, index);
        if (!PyBytes_Check(name)) {
            PyErr_Format(PyExc_TypeError, "dropped[%zd] is not bytes", index);
            return NULL;
        }
    }
    Py_ssize_t count = PyList_GET_SIZE(headers);
    /* First pass: check every pair, decide which cross, and size the lines. */
    char stack_keep[32];
    char *keep = count <= (Py_ssize_t)sizeof(stack_keep) ? stack_keep : PyMem_Malloc(count);
    if (keep == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *held = PyList_New(0), *lines = NULL, *result = NULL;
    if (held == NULL) {
        goto done;
    }
    Py_ssize_t size = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *pair = PyList_GET_ITEM(headers, index);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] is not a (name, value) pair of bytes", index);
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t position = find((const unsigned char *)PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), dropped);
        keep[index] = position < 0;
        if (position < 0) {
            size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;  /* ": " and CRLF */
            continue;
        }
        PyObject *entry = PyTuple_New(2);
        PyObject *index_object = PyLong_FromSsize_t(position);  /* a small int: cached, not allocated */
        if (entry == NULL || index_object == NULL) {
            Py_XDECREF(entry);
            Py_XDECREF(index_object);
            goto done;
        }
        PyTuple_SET_ITEM(entry, 0, index_object);
        PyTuple_SET_ITEM(entry, 1, Py_NewRef(value));
        int appended = PyList_Append(held, entry);
        Py_DECREF(entry);
        if (appended < 0) {
            goto done;
        }
    }
    lines = PyBytes_FromStringAndSize(NULL, size);
    if (lines == NULL) {
        goto done;
    }
    char *out = PyBytes_AS_STRING(lines);
    for (Py_ssize_t index = 0; index < count; index++) {
        if (!keep[index]) {
            continue;
        }
        PyObject *pair = PyList_GET_ITEM(headers, index);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        memcpy(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
        out += PyBytes_GET_SIZE(name);
        *out++ = ':';
        *out++ = ' ';
        memcpy(out, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
        out += PyBytes_GET_SIZE(value);
        *out++ = '\r';
        *out++ = '\n';
    }
    result = PyTuple_Pack(2, lines, held);
done:
    if (keep != stack_keep) {
        PyMem_Free(keep);
    }
    Py_XDECREF(lines);
    Py_XDECREF(held);
    return result;
}

/* parse_response(data) -> (status, headers, body) or None

   One upstream response, complete in `data` and nothing after it, in the plain form the model servers
   answer with: "HTTP/1.1 SSS reason", header lines of a token name, a colon and a value of visible
   characters, spaces and tabs (leading ones skipped, as llhttp does), exactly one Content-Length and no
   Transfer-Encoding or Connection header, then exactly Content-Length bytes of body. headers is a list of
   (name, value) pairs of bytes, as httptools reports them; the connection stays open (HTTP/1.1, no
   Connection header). Anything else, including a status below 200, 204, 304, a trailing space in a value,
   an empty value, more than MAX_FAST_HEADERS headers or a response split over reads, gives None: the
   caller then feeds the same bytes to httptools, which handles every form. So where this answers, it must
   answer as httptools would; tests/test_hop_headers.py checks that on thousands of random responses.

   httptools calls back into Python for every header, the body and the message's end, and each callback
   costs a method lookup and a call; this builds the same objects in one call. */

#define MAX_FAST_HEADERS 32
#define MAX_LENGTH_DIGITS 15

static int is_token(unsigned char byte) {
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z') || (byte >= '0' && byte <= '9')
           || (byte != 0 && memchr(extra, byte, sizeof(extra) - 1) != NULL);
}

static int is_text(unsigned char byte) {  /* visible ASCII, space or tab: no obs-text, no control */
    return byte == '\t' || (byte >= ' ' && byte <= '~');
}

/* Whether `length` bytes at `name` are `lower_name` (lower case) in any ASCII case. */
static int named(const unsigned char *name, Py_ssize_t length, const char *lower_name) {
    if ((size_t)length != strlen(lower_name)) {
        return 0;
    }
    for (Py_ssize_t at = 0; at < length; at++) {
        if (lower(name[at]) != lower_name[at]) {
            return 0;
        }
    }
    return 1;
}

struct span {
    Py_ssize_t start, length;
};

static PyObject *parse_response(PyObject *module, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data: bytes)");
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    /* "HTTP/1.1 " + three digits + " " */
    if (size < 13 || memcmp(text, "HTTP/1.1 ", 9) != 0 || text[12] != ' ') {
        Py_RETURN_NONE;
    }
    int status = 0;
    for (int at = 9; at < 12; at++) {
        if (text[at] < '0' || text[at] > '9') {
            Py_RETURN_NONE;
        }
        status = status * 10 + (text[at] - '0');
    }
    if (status < 200 || status > 599 || status == 204 || status == 304) {
        Py_RETURN_NONE;
    }
    Py_ssize_t at = 13;
    while (at < size && text[at] != '\r') {
        if (!is_text(text[at])) {
            Py_RETURN_NONE;
        }
        at++;
    }
    if (at + 1 >= size || text[at + 1] != '\n') {
        Py_RETURN_NONE;
    }
    at += 2;
    struct span names[MAX_FAST_HEADERS], values[MAX_FAST_HEADERS];
    int count = 0;
    long long content_length = -1;
    for (;;) {
        if (at + 1 < size && text[at] == '\r' && text[at + 1] == '\n') {
            at += 2;
            break;
        }
        if (count == MAX_FAST_HEADERS) {
            Py_RETURN_NONE;
        }
        Py_ssize_t name_start = at;
        while (at < size && is_token(text[at])) {
            at++;
        }
        if (at == name_start || at >= size || text[at] != ':') {
            Py_RETURN_NONE;
        }
        Py_ssize_t name_length = at - name_start;
        at++;
        while (at < size && (text[at] == ' ' || text[at] == '\t')) {
            at++;
        }
        Py_ssize_t value_start = at;
        while (at < size && text[at] != '\r') {
            if (!is_text(text[at])) {
                Py_RETURN_NONE;
            }
            at++;
        }
        Py_ssize_t value_length = at - value_start;
        if (at + 1 >= size || text[at + 1] != '\n' || value_length == 0 || text[at - 1] == ' '
                || text[at - 1] == '\t') {
            Py_RETURN_NONE;
        }
        at += 2;
        const unsigned char *name = text + name_start;
        if (named(name, name_length, "content-length")) {
            if (content_length >= 0 || value_length > MAX_LENGTH_DIGITS) {
                Py_RETURN_NONE;
            }
            content_length = 0;
            for (Py_ssize_t digit = value_start; digit < value_start + value_length; digit++) {
                if (text[digit] < '0' || text[digit] > '9') {
                    Py_RETURN_NONE;
                }
                content_length = content_length * 10 + (text[digit] - '0');
            }
        } else if (named(name, name_length, "transfer-encoding") || named(name, name_length, "connection")) {
            Py_RETURN_NONE;
        }
        names[count] = (struct span){name_start, name_length};
        values[count] = (struct span){value_start, value_length};
        count++;
    }
    if (content_length < 0 || size - at != content_length) {
        Py_RETURN_NONE;
    }
    PyObject *headers = PyList_New(count), *body = NULL, *result = NULL;
    if (headers == NULL) {
        return NULL;
    }
    for (int index = 0; index < count; index++) {
        PyObject *name = PyBytes_FromStringAndSize((const char *)text + names[index].start, names[index].length);
        PyObject *value = name == NULL ? NULL
            : PyBytes_FromStringAndSize((const char *)text + values[index].start, values[index].length);
        PyObject *pair = value == NULL ? NULL : PyTuple_New(2);
        if (pair == NULL) {
            Py_XDECREF(name);
            Py_XDECREF(value);
            goto done;
        }
        PyTuple_SET_ITEM(pair, 0, name);
        PyTuple_SET_ITEM(pair, 1, value);
        PyList_SET_ITEM(headers, index, pair);
    }
    body = PyBytes_FromStringAndSize((const char *)text + at, size - at);
    if (body != NULL) {
        result = Py_BuildValue("(iOO)", status, headers, body);
    }
done:
    Py_DECREF(headers);
    Py_XDECREF(body);
    return result;
}

static PyMethodDef headers_methods[] = {
    {"strip", (PyCFunction)(void (*)(void))strip, METH_FASTCALL,
     "strip(headers, dropped) -> (lines, held): see balancer/_headers.c."},
    {"parse_response", (PyCFunction)parse_response, METH_O,
     "parse_response(data) -> (status, headers, body) or None: see balancer/_headers.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef headers_module = {
    PyModuleDef_HEAD_INIT, "balancer._headers",
    "Header lines in C: those that cross the hop, and plain upstream responses (see balancer/_headers.c).", -1,
    headers_methods,
};

PyMODINIT_FUNC PyInit__headers(void) {
    return PyModule_Create(&headers_module);
}
