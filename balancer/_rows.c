/* The outcome log's request rows on the pipe to the store writer: a flat list of columns, row after row.

   `marshal` carried them before: for every object with more than one reference (each request id,
   which the feedback map also holds; the shared experiment, variant and upstream strings; cached
   small ints) it looked up and inserted into a hash table it built per call, about 2,300 of the
   balancer's ~5,800 instructions per logged request (`python -m bench.instructions`). This codec
   knows the row's shape: a value is a tag byte and its bytes, and a str or int that is the very
   object of the same column one row up is a single byte.

   Frame: "R", FORMAT, the row width (1 byte), the row count (4 bytes, native order: both ends run on
   one machine), then each value:
     NONE; SAME (the value of this column in the previous row); FLOAT + 8 bytes; INT + 8 bytes
     (int64); ASCII + 1-byte length + bytes; TEXT + 4-byte length + UTF-8 bytes.
   `encode` accepts only exact str, int (within int64), float and None, like the store's columns;
   anything else raises ValueError naming the position, as marshal did for what it cannot carry.
   `decode` checks every length and tag, and that ASCII is ASCII, before it builds an object. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAGIC 'R'
#define FORMAT 1
#define HEADER_SIZE 7

enum { TAG_NONE = 0, TAG_SAME = 1, TAG_FLOAT = 2, TAG_INT = 3, TAG_ASCII = 4, TAG_TEXT = 5 };

typedef struct {
    PyObject *bytes;
    char *data;
    Py_ssize_t used;
    Py_ssize_t capacity;
} Buffer;

static int reserve(Buffer *buffer, Py_ssize_t more) {
    if (buffer->used + more <= buffer->capacity) {
        return 0;
    }
    Py_ssize_t capacity = buffer->capacity * 2;
    if (capacity < buffer->used + more) {
        capacity = buffer->used + more;
    }
    if (_PyBytes_Resize(&buffer->bytes, capacity) < 0) {
        return -1;
    }
    buffer->data = PyBytes_AS_STRING(buffer->bytes);
    buffer->capacity = capacity;
    return 0;
}

static PyObject *rows_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "encode(columns: list, width: int, start: int, stop: int)");
        return NULL;
    }
    PyObject *columns = args[0];
    Py_ssize_t width = PyLong_AsSsize_t(args[1]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyList_GET_SIZE(columns);
    if (stop > size) {
        stop = size;
    }
    if (width < 1 || width > 255 || start < 0 || start > stop || start % width || (stop - start) % width
            || (stop - start) / width > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "cannot encode columns %zd to %zd of %zd as rows of %zd", start, stop, size, width);
        return NULL;
    }
    Buffer buffer = {NULL, NULL, 0, HEADER_SIZE + (stop - start) * 12 + 64};
    buffer.bytes = PyBytes_FromStringAndSize(NULL, buffer.capacity);
    if (buffer.bytes == NULL) {
        return NULL;
    }
    buffer.data = PyBytes_AS_STRING(buffer.bytes);
    uint32_t rows = (uint32_t)((stop - start) / width);
    buffer.data[0] = MAGIC;
    buffer.data[1] = FORMAT;
    buffer.data[2] = (char)width;
    memcpy(buffer.data + 3, &rows, 4);
    buffer.used = HEADER_SIZE;
    for (Py_ssize_t index = start; index < stop; index++) {
        PyObject *value = PyList_GET_ITEM(columns, index);
        if (reserve(&buffer, 9) < 0) {
            return NULL;
        }
        char *out = buffer.data + buffer.used;
        if (value == Py_None) {
            out[0] = TAG_NONE;
            buffer.used += 1;
        } else if (index - start >= width && value == PyList_GET_ITEM(columns, index - width)
                   && (PyUnicode_CheckExact(value) || PyLong_CheckExact(value))) {
            out[0] = TAG_SAME;
            buffer.used += 1;
        } else if (PyFloat_CheckExact(value)) {
            double number = PyFloat_AS_DOUBLE(value);
            out[0] = TAG_FLOAT;
            memcpy(out + 1, &number, 8);
            buffer.used += 9;
        } else if (PyLong_CheckExact(value)) {
            int overflow = 0;
            long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (overflow) {
                Py_DECREF(buffer.bytes);
                PyErr_Format(PyExc_ValueError, "column %zd of row %zd: the integer does not fit 64 bits",
                             (index - start) % width, (index - start) / width);
                return NULL;
            }
            int64_t fixed = (int64_t)number;
            out[0] = TAG_INT;
            memcpy(out + 1, &fixed, 8);
            buffer.used += 9;
        } else if (PyUnicode_CheckExact(value)) {
            Py_ssize_t length;
            const char *text;
            int ascii = PyUnicode_IS_ASCII(value) && PyUnicode_GET_LENGTH(value) <= 255;
            if (ascii) {
                length = PyUnicode_GET_LENGTH(value);
                text = (const char *)PyUnicode_1BYTE_DATA(value);
            } else {
                text = PyUnicode_AsUTF8AndSize(value, &length);
                if (text == NULL) {  /* a lone surrogate: no UTF-8 for it, and SQLite could not store it either */
                    Py_DECREF(buffer.bytes);
                    PyErr_Clear();
                    PyErr_Format(PyExc_ValueError, "column %zd of row %zd: the text is not valid Unicode",
                                 (index - start) % width, (index - start) / width);
                    return NULL;
                }
                if (length > UINT32_MAX) {
                    Py_DECREF(buffer.bytes);
                    PyErr_Format(PyExc_ValueError, "column %zd of row %zd: the text is too long",
                                 (index - start) % width, (index - start) / width);
                    return NULL;
                }
            }
            if (reserve(&buffer, 5 + length) < 0) {
                return NULL;
            }
            out = buffer.data + buffer.used;
            if (ascii) {
                out[0] = TAG_ASCII;
                out[1] = (char)(unsigned char)length;
                memcpy(out + 2, text, length);
                buffer.used += 2 + length;
            } else {
                uint32_t size32 = (uint32_t)length;
                out[0] = TAG_TEXT;
                memcpy(out + 1, &size32, 4);
                memcpy(out + 5, text, length);
                buffer.used += 5 + length;
            }
        } else {
            Py_DECREF(buffer.bytes);
            PyErr_Format(PyExc_ValueError, "column %zd of row %zd: a %.100s cannot be stored (str, int, float or None)",
                         (index - start) % width, (index - start) / width, Py_TYPE(value)->tp_name);
            return NULL;
        }
    }
    if (_PyBytes_Resize(&buffer.bytes, buffer.used) < 0) {
        return NULL;
    }
    return buffer.bytes;
}

static PyObject *corrupt(PyObject *list, Py_ssize_t offset, const char *what) {
    Py_XDECREF(list);
    PyErr_Format(PyExc_ValueError, "corrupt rows frame at byte %zd: %s", offset, what);
    return NULL;
}

static PyObject *rows_decode(PyObject *module, PyObject *argument) {
    Py_buffer view;
    if (PyObject_GetBuffer(argument, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len, at = HEADER_SIZE;
    PyObject *list = NULL;
    if (size < HEADER_SIZE || data[0] != MAGIC || data[1] != FORMAT || data[2] == 0) {
        PyBuffer_Release(&view);
        return corrupt(NULL, 0, "not a rows frame of this format");
    }
    Py_ssize_t width = data[2];
    uint32_t rows;
    memcpy(&rows, data + 3, 4);
    Py_ssize_t count = (Py_ssize_t)rows * width;
    if (count > size - HEADER_SIZE) {  /* every value takes at least one byte */
        PyBuffer_Release(&view);
        return corrupt(NULL, 3, "more rows than bytes");
    }
    list = PyList_New(count);
    if (list == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *value;
        if (at >= size) {
            PyBuffer_Release(&view);
            return corrupt(list, at, "it ends early");
        }
        unsigned char tag = data[at++];
        switch (tag) {
        case TAG_NONE:
            value = Py_NewRef(Py_None);
            break;
        case TAG_SAME:
            if (index < width) {
                PyBuffer_Release(&view);
                return corrupt(list, at - 1, "a repeat in the first row");
            }
            value = Py_NewRef(PyList_GET_ITEM(list, index - width));
            break;
        case TAG_FLOAT:
        case TAG_INT:
            if (size - at < 8) {
                PyBuffer_Release(&view);
                return corrupt(list, at, "it ends inside a number");
            }
            if (tag == TAG_FLOAT) {
                double number;
                memcpy(&number, data + at, 8);
                value = PyFloat_FromDouble(number);
            } else {
                int64_t number;
                memcpy(&number, data + at, 8);
                value = PyLong_FromLongLong((long long)number);
            }
            at += 8;
            break;
        case TAG_ASCII: {
            if (at >= size || size - at - 1 < data[at]) {
                PyBuffer_Release(&view);
                return corrupt(list, at, "it ends inside a text");
            }
            Py_ssize_t length = data[at++];
            for (Py_ssize_t offset = 0; offset < length; offset++) {
                if (data[at + offset] & 0x80) {
                    PyBuffer_Release(&view);
                    return corrupt(list, at + offset, "a non-ASCII byte in an ASCII text");
                }
            }
            value = PyUnicode_New(length, 127);
            if (value != NULL) {
                memcpy(PyUnicode_1BYTE_DATA(value), data + at, length);
            }
            at += length;
            break;
        }
        case TAG_TEXT: {
            uint32_t length;
            if (size - at < 4) {
                PyBuffer_Release(&view);
                return corrupt(list, at, "it ends inside a text's length");
            }
            memcpy(&length, data + at, 4);
            at += 4;
            if ((Py_ssize_t)length > size - at) {
                PyBuffer_Release(&view);
                return corrupt(list, at, "it ends inside a text");
            }
            value = PyUnicode_DecodeUTF8((const char *)data + at, length, "strict");
            at += length;
            break;
        }
        default:
            PyBuffer_Release(&view);
            return corrupt(list, at - 1, "an unknown tag");
        }
        if (value == NULL) {
            PyBuffer_Release(&view);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, index, value);
    }
    PyBuffer_Release(&view);
    if (at != size) {
        return corrupt(list, at, "bytes after the last row");
    }
    return list;
}

static PyMethodDef rows_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))rows_encode, METH_FASTCALL,
     "encode(columns, width, start, stop) -> bytes: columns[start:stop], rows of `width`, as one frame."},
    {"decode", rows_decode, METH_O, "decode(frame) -> list: the columns `encode` was given, row after row."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef rows_module = {
    PyModuleDef_HEAD_INIT, "balancer._rows",
    "The store writer's request rows codec (see balancer/_rows.c).", -1, rows_methods,
};

PyMODINIT_FUNC PyInit__rows(void) {
    return PyModule_Create(&rows_module);
}
