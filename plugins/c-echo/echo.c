/*
 * c-echo: a plugin written in C against plugin_api.h, with no Rust involved.
 * Built against ABI 1.1 (the host functions and output streams of PluginHostContext).
 *
 * Methods:
 *   echo   returns its input bytes unchanged (MessagePack in, the same MessagePack out)
 *   length returns the input's length in bytes, as a MessagePack unsigned integer
 *   fail   returns an error (PLUGIN_ERROR) with a message
 *   ask    (ABI 1.1) calls the host function "echo" (listed in plugin.toml's `imports`)
 *          with its input bytes and returns the host's output unchanged; when the host
 *          answers another status, returns PLUGIN_ERROR with a message naming the status
 *          and carrying the host's message
 *   count  (ABI 1.1) for a call_stream(): emits N stream items, N being the input's
 *          length in bytes, item i the MessagePack unsigned integer i; returns N. Stops
 *          with PLUGIN_ERROR naming the status when emit() does not answer OK (the
 *          consumer is gone, or the caller used call() rather than call_stream())
 *
 * Build: sh plugins/c-echo/build.sh, which compiles this file into libc_echo.so next to
 * plugin.toml (cc -shared -fPIC -I plugin-api/include -o libc_echo.so echo.c).
 * tests/abi-1.0/echo.c is this plugin as it was for ABI 1.0 (echo, length and fail only),
 * kept to prove that hosts still load 1.0 libraries.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin_api.h"

/* The tests also build this file with another ABI major (-DC_ECHO_ABI_MAJOR=99) and with
 * no entry symbol (-DC_ECHO_NO_ENTRY) to check that hosts refuse such libraries. */
#ifndef C_ECHO_ABI_MAJOR
#define C_ECHO_ABI_MAJOR PLUGIN_API_ABI_MAJOR
#endif

typedef struct Echo {
    int unused; /* a real plugin keeps its state here */
} Echo;

static int32_t put_bytes(PluginBuffer *out, const uint8_t *bytes, size_t len) {
    out->ptr = NULL;
    out->len = 0;
    out->cap = 0;
    if (len == 0) {
        return 0;
    }
    out->ptr = malloc(len);
    if (out->ptr == NULL) {
        return -1;
    }
    memcpy(out->ptr, bytes, len);
    out->len = len;
    out->cap = len;
    return 0;
}

static int32_t put_text(PluginBuffer *out, const char *text) {
    return put_bytes(out, (const uint8_t *)text, strlen(text));
}

/* Writes the MessagePack encoding of `n` (the shortest form) to `out` (9 bytes at most);
 * returns its length. */
static size_t encode_uint(uint64_t n, uint8_t out[9]) {
    size_t width;
    if (n < 0x80) {
        out[0] = (uint8_t)n; /* positive fixint */
        return 1;
    } else if (n <= 0xff) {
        out[0] = 0xcc;
        width = 1;
    } else if (n <= 0xffff) {
        out[0] = 0xcd;
        width = 2;
    } else if (n <= 0xffffffffu) {
        out[0] = 0xce;
        width = 4;
    } else {
        out[0] = 0xcf;
        width = 8;
    }
    for (size_t i = 0; i < width; i++) {
        out[width - i] = (uint8_t)(n >> (8 * i)); /* big-endian */
    }
    return 1 + width;
}

static const char *host_status_name(int32_t status) {
    switch (status) {
    case PLUGIN_HOST_OK: return "OK";
    case PLUGIN_HOST_ERROR: return "ERROR";
    case PLUGIN_HOST_PANIC: return "PANIC";
    case PLUGIN_HOST_NOT_FOUND: return "NOT_FOUND";
    case PLUGIN_HOST_BAD_INPUT: return "BAD_INPUT";
    case PLUGIN_HOST_NOT_IMPORTED: return "NOT_IMPORTED";
    case PLUGIN_HOST_NOT_GRANTED: return "NOT_GRANTED";
    case PLUGIN_HOST_CANCELLED: return "CANCELLED";
    case PLUGIN_HOST_UNSUPPORTED: return "UNSUPPORTED";
    case PLUGIN_HOST_LIMIT: return "LIMIT";
    default: return "unknown status";
    }
}

static const char *emit_status_name(int32_t status) {
    switch (status) {
    case PLUGIN_EMIT_OK: return "OK";
    case PLUGIN_EMIT_CLOSED: return "CLOSED";
    case PLUGIN_EMIT_NOT_STREAM: return "NOT_STREAM";
    case PLUGIN_EMIT_UNSUPPORTED: return "UNSUPPORTED";
    case PLUGIN_EMIT_LIMIT: return "LIMIT";
    default: return "unknown status";
    }
}

/* Writes an error message to `out`: "`what` answered NAME (number)", then ": " and
 * `detail` (not NUL-terminated; may be empty). */
static int32_t put_status_error(PluginBuffer *out, const char *what, const char *name,
                                int32_t status, const uint8_t *detail, size_t detail_len) {
    char head[128];
    int n = snprintf(head, sizeof head, "%s answered %s (%d)", what, name, (int)status);
    if (n < 0) {
        return put_text(out, "c-echo: formatting an error failed");
    }
    size_t head_len = (size_t)n < sizeof head ? (size_t)n : sizeof head - 1;
    size_t len = head_len + (detail_len > 0 ? 2 + detail_len : 0);
    out->ptr = malloc(len);
    out->len = 0;
    out->cap = 0;
    if (out->ptr == NULL) {
        return -1;
    }
    memcpy(out->ptr, head, head_len);
    if (detail_len > 0) {
        memcpy(out->ptr + head_len, ": ", 2);
        memcpy(out->ptr + head_len + 2, detail, detail_len);
    }
    out->len = len;
    out->cap = len;
    return 0;
}

static int32_t echo_create(const PluginHostContext *host, const uint8_t *config,
                           size_t config_len, void **instance, PluginBuffer *error) {
    (void)config;
    (void)config_len;
    Echo *echo = calloc(1, sizeof(Echo));
    if (echo == NULL) {
        put_text(error, "out of memory");
        return PLUGIN_ERROR;
    }
    static const char msg[] = "c-echo created";
    host->log(host->data, PLUGIN_LOG_INFO, (const uint8_t *)msg, sizeof msg - 1);
    *instance = echo;
    return PLUGIN_OK;
}

static int method_is(const uint8_t *method, size_t len, const char *name) {
    return strlen(name) == len && memcmp(method, name, len) == 0;
}

/* `ask`: the host function "echo" with our input; its output becomes ours. */
static int32_t echo_ask(const uint8_t *input, size_t input_len, const PluginHostContext *host,
                        PluginBuffer *output) {
    static const char name[] = "echo";
    PluginBuffer answer = {NULL, 0, 0};
    int32_t status = host->call_host(host->data, (const uint8_t *)name, sizeof name - 1, input,
                                     input_len, &answer);
    int32_t result = PLUGIN_OK;
    if (status == PLUGIN_HOST_OK) {
        if (put_bytes(output, answer.ptr, answer.len) != 0) {
            put_text(output, "out of memory");
            result = PLUGIN_ERROR;
        }
    } else {
        if (put_status_error(output, "host function `echo`",
                             host_status_name(status), status, answer.ptr,
                             answer.len) != 0) {
            put_text(output, "out of memory");
        }
        result = PLUGIN_ERROR;
    }
    /* Whatever the status, the buffer (if any) goes back to the host. */
    if (answer.ptr != NULL) {
        host->free_host_buffer(answer);
    }
    return result;
}

/* `count`: items 0, 1, ..., input_len - 1, then input_len as the output. */
static int32_t echo_count(size_t input_len, const PluginHostContext *host,
                          PluginBuffer *output) {
    uint8_t item[9];
    for (uint64_t i = 0; i < (uint64_t)input_len; i++) {
        size_t len = encode_uint(i, item);
        int32_t status = host->emit(host->data, item, len);
        if (status != PLUGIN_EMIT_OK) {
            char at[64];
            snprintf(at, sizeof at, "after %llu items", (unsigned long long)i);
            if (put_status_error(output, "emit", emit_status_name(status),
                                 status, (const uint8_t *)at, strlen(at)) != 0) {
                put_text(output, "out of memory");
            }
            return PLUGIN_ERROR;
        }
    }
    size_t len = encode_uint((uint64_t)input_len, item);
    if (put_bytes(output, item, len) != 0) {
        put_text(output, "out of memory");
        return PLUGIN_ERROR;
    }
    return PLUGIN_OK;
}

static int32_t echo_call(void *instance, const uint8_t *method, size_t method_len,
                         const uint8_t *input, size_t input_len, const PluginHostContext *host,
                         PluginBuffer *output) {
    (void)instance;
    if (method_is(method, method_len, "echo")) {
        host->progress(host->data, 1.0, (const uint8_t *)"echoed", 6);
        if (put_bytes(output, input, input_len) != 0) {
            put_text(output, "out of memory");
            return PLUGIN_ERROR;
        }
        return PLUGIN_OK;
    }
    if (method_is(method, method_len, "length")) {
        /* MessagePack uint 64: 0xcf followed by 8 big-endian bytes. */
        uint8_t encoded[9];
        uint64_t n = (uint64_t)input_len;
        encoded[0] = 0xcf;
        for (int i = 0; i < 8; i++) {
            encoded[8 - i] = (uint8_t)(n >> (8 * i));
        }
        put_bytes(output, encoded, sizeof encoded);
        return PLUGIN_OK;
    }
    if (method_is(method, method_len, "fail")) {
        put_text(output, "c-echo was asked to fail");
        return PLUGIN_ERROR;
    }
    if (method_is(method, method_len, "ask")) {
        return echo_ask(input, input_len, host, output);
    }
    if (method_is(method, method_len, "count")) {
        return echo_count(input_len, host, output);
    }
    put_text(output, "c-echo has no such method");
    return PLUGIN_UNKNOWN_METHOD;
}

static void echo_free_buffer(PluginBuffer buffer) { free(buffer.ptr); }

static void echo_destroy(void *instance) { free(instance); }

static const PluginStr METHODS[] = {
    {(const uint8_t *)"echo", 4},
    {(const uint8_t *)"length", 6},
    {(const uint8_t *)"fail", 4},
    {(const uint8_t *)"ask", 3},
    {(const uint8_t *)"count", 5},
};

static const PluginDescriptor DESCRIPTOR = {
    C_ECHO_ABI_MAJOR,
    PLUGIN_API_ABI_MINOR,
    "c-echo",
    "1.0.0",
    METHODS,
    sizeof METHODS / sizeof METHODS[0],
    echo_create,
    echo_call,
    echo_free_buffer,
    echo_destroy,
};

#ifndef C_ECHO_NO_ENTRY
const PluginDescriptor *plugin_api_entry(void) { return &DESCRIPTOR; }
#else
const PluginDescriptor *not_the_entry(void) { return &DESCRIPTOR; }
#endif
