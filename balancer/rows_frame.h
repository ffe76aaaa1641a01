/* The rows frame's format (balancer/_rows.c says what it is and why) and the one reader of it in C, shared by
   `_rows.decode` (which builds Python objects) and `_store.Connection.insert_requests` (which binds the values
   straight into SQLite). Every length, tag and text is checked before a value is handed out. */

#ifndef BALANCER_ROWS_FRAME_H
#define BALANCER_ROWS_FRAME_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ROWS_MAGIC 'R'
#define ROWS_FORMAT 2
#define ROWS_HEADER_SIZE 7
#define ROWS_MAX_WIDTH 255

enum { TAG_NONE = 0, TAG_SAME = 1, TAG_FLOAT = 2, TAG_INT = 3, TAG_ASCII = 4, TAG_TEXT = 5, TAG_ZERO = 6 };

/* One value as read: `tag` is never TAG_SAME (a repeat is resolved to the value above it, and `repeated` set). */
typedef struct {
    unsigned char tag;
    unsigned char repeated;
    double real;  /* TAG_FLOAT */
    int64_t integer;  /* TAG_INT */
    const char *text;  /* TAG_ASCII and TAG_TEXT: points into the frame */
    Py_ssize_t length;
} FrameValue;

typedef struct {
    const unsigned char *data;
    Py_ssize_t size;
    Py_ssize_t at;  /* the next byte to read */
    Py_ssize_t width;
    Py_ssize_t count;  /* values in the frame: rows x width */
    Py_ssize_t index;  /* values read so far */
    int check_utf8;  /* TAG_TEXT is checked here (for a reader that does not decode it itself) */
    const char *error;  /* set when a call returned -1, with the byte it refers to */
    Py_ssize_t error_at;
    FrameValue above[ROWS_MAX_WIDTH];  /* the previous row, for TAG_SAME */
} FrameReader;

static int frame_fail(FrameReader *reader, Py_ssize_t at, const char *what) {
    reader->error = what;
    reader->error_at = at;
    return -1;
}

/* Whether `text` is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF): what Python's
   strict decoder accepts. */
static int frame_utf8_is_valid(const unsigned char *text, Py_ssize_t length) {
    Py_ssize_t at = 0;
    while (at < length) {
        unsigned char byte = text[at];
        if (byte < 0x80) {
            at++;
            continue;
        }
        Py_ssize_t follow;
        unsigned char low = 0x80, high = 0xBF;  /* the range of the byte after the lead */
        if (byte >= 0xC2 && byte <= 0xDF) {
            follow = 1;
        } else if (byte >= 0xE0 && byte <= 0xEF) {
            follow = 2;
            if (byte == 0xE0) low = 0xA0;
            if (byte == 0xED) high = 0x9F;
        } else if (byte >= 0xF0 && byte <= 0xF4) {
            follow = 3;
            if (byte == 0xF0) low = 0x90;
            if (byte == 0xF4) high = 0x8F;
        } else {
            return 0;
        }
        if (length - at - 1 < follow || text[at + 1] < low || text[at + 1] > high) {
            return 0;
        }
        for (Py_ssize_t next = 2; next <= follow; next++) {
            if ((text[at + next] & 0xC0) != 0x80) {
                return 0;
            }
        }
        at += follow + 1;
    }
    return 1;
}

/* Read the header: 0, or -1 with `error` set. */
static int frame_open(FrameReader *reader, const void *data, Py_ssize_t size, int check_utf8) {
    const unsigned char *bytes = data;
    reader->data = bytes;
    reader->size = size;
    reader->at = ROWS_HEADER_SIZE;
    reader->index = 0;
    reader->check_utf8 = check_utf8;
    reader->error = NULL;
    reader->error_at = 0;
    if (size < ROWS_HEADER_SIZE || bytes[0] != ROWS_MAGIC || bytes[1] != ROWS_FORMAT || bytes[2] == 0) {
        return frame_fail(reader, 0, "not a rows frame of this format");
    }
    reader->width = bytes[2];
    uint32_t rows;
    memcpy(&rows, bytes + 3, 4);
    reader->count = (Py_ssize_t)rows * reader->width;
    if (reader->count > size - ROWS_HEADER_SIZE) {  /* every value takes at least one byte */
        return frame_fail(reader, 3, "more rows than bytes");
    }
    return 0;
}

/* Read the next value (there are `count`): 0, or -1 with `error` set. */
static int frame_next(FrameReader *reader, FrameValue *value) {
    const unsigned char *data = reader->data;
    Py_ssize_t size = reader->size, at = reader->at;
    Py_ssize_t column = reader->index % reader->width;
    if (at >= size) {
        return frame_fail(reader, at, "it ends early");
    }
    unsigned char tag = data[at++];
    value->tag = tag;
    value->repeated = 0;
    switch (tag) {
    case TAG_NONE:
    case TAG_ZERO:
        break;
    case TAG_SAME:
        if (reader->index < reader->width) {
            return frame_fail(reader, at - 1, "a repeat in the first row");
        }
        *value = reader->above[column];
        value->repeated = 1;
        break;
    case TAG_FLOAT:
    case TAG_INT:
        if (size - at < 8) {
            return frame_fail(reader, at, "it ends inside a number");
        }
        if (tag == TAG_FLOAT) {
            memcpy(&value->real, data + at, 8);
        } else {
            memcpy(&value->integer, data + at, 8);
        }
        at += 8;
        break;
    case TAG_ASCII: {
        if (at >= size || size - at - 1 < data[at]) {
            return frame_fail(reader, at, "it ends inside a text");
        }
        Py_ssize_t length = data[at++];
        for (Py_ssize_t offset = 0; offset < length; offset++) {
            if (data[at + offset] & 0x80) {
                return frame_fail(reader, at + offset, "a non-ASCII byte in an ASCII text");
            }
        }
        value->text = (const char *)data + at;
        value->length = length;
        at += length;
        break;
    }
    case TAG_TEXT: {
        uint32_t length;
        if (size - at < 4) {
            return frame_fail(reader, at, "it ends inside a text's length");
        }
        memcpy(&length, data + at, 4);
        at += 4;
        if ((Py_ssize_t)length > size - at) {
            return frame_fail(reader, at, "it ends inside a text");
        }
        if (reader->check_utf8 && !frame_utf8_is_valid(data + at, length)) {
            return frame_fail(reader, at, "a text that is not UTF-8");
        }
        value->text = (const char *)data + at;
        value->length = length;
        at += length;
        break;
    }
    default:
        return frame_fail(reader, at - 1, "an unknown tag");
    }
    reader->above[column] = *value;
    reader->at = at;
    reader->index++;
    return 0;
}

/* After the last value: 0 if the frame ends there, or -1 with `error` set. */
static int frame_close(FrameReader *reader) {
    return reader->at == reader->size ? 0 : frame_fail(reader, reader->at, "bytes after the last row");
}

/* The ValueError a failed read becomes; NULL. */
static PyObject *frame_error(const FrameReader *reader) {
    PyErr_Format(PyExc_ValueError, "corrupt rows frame at byte %zd: %s", reader->error_at, reader->error);
    return NULL;
}

#endif
