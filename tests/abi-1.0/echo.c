/*
 * FROZEN: this file is a copy of plugins/c-echo/echo.c as it was for plugin ABI 1.0
 * (before ABI 1.1 appended call_host, emit and free_host_buffer to PluginHostContext). Do not
 * edit it: tests/build.rs compiles tests/abi-1.0/echo.c against tests/abi-1.0/plugin_api.h
 * only (C_ECHO_ABI10_LIBRARY), and tests/tests/abi_compat.rs loads the result to prove that
 * hosts built for newer minors still load and run a library built for ABI 1.0.
 */
/*
 * c-echo: a plugin written in C against plugin_api.h, with no Rust involved.
 *
 * Methods:
 *   echo   returns its input bytes unchanged (MessagePack in, the same MessagePack out)
 *   length returns the input's length in bytes, as a MessagePack unsigned integer
 *   fail   returns an error (PLUGIN_ERROR) with a message
 *
 * Build: sh plugins/c-echo/build.sh, which compiles this file into libc_echo.so next to
 * plugin.toml (cc -shared -fPIC -I plugin-api/include -o libc_echo.so echo.c).
 */
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
    put_text(output, "c-echo has no such method");
    return PLUGIN_UNKNOWN_METHOD;
}

static void echo_free_buffer(PluginBuffer buffer) { free(buffer.ptr); }

static void echo_destroy(void *instance) { free(instance); }

static const PluginStr METHODS[] = {
    {(const uint8_t *)"echo", 4},
    {(const uint8_t *)"length", 6},
    {(const uint8_t *)"fail", 4},
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
