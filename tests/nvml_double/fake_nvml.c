/*
 * A test double of libnvidia-ml.so.1: just the nvml* symbols throttllem's NVML driver reaches
 * through pynvml, so the real pynvml code path runs on a machine without a GPU.
 *
 * Built by the test suite (tests/unit/gpu/conftest.py) as libnvidia-ml.so.1 and loaded either by
 * assigning pynvml.nvmlLib or, in subprocesses, through LD_LIBRARY_PATH.
 *
 * Controlled from the environment:
 *   FAKE_NVML_GPU_COUNT      number of GPUs (default 1, at most 16); read by nvmlInit
 *   FAKE_NVML_CLOCKS         "max:min:step" SM clocks in MHz (default "1410:210:15", an A100)
 *   FAKE_NVML_MEM_CLOCKS     memory clocks in any order (default "1215,405"); at any memory
 *                            clock but the highest, graphics clocks stop half-way up the range,
 *                            so a driver that asks about the wrong memory clock is caught
 *   FAKE_NVML_POWER_LIMIT_MW enforced power limit (default 400000)
 *   FAKE_NVML_PRIVILEGED     "0": every clock write returns NVML_ERROR_NO_PERMISSION
 *   FAKE_NVML_SET_DELAY_US   each clock write sleeps this long first (a real write takes ms)
 *   FAKE_NVML_FAIL           forced return codes, read on every call so a test can change them
 *                            mid-run: "name=code[,name@gpu=code...]"; name is an nvml* symbol
 *                            or "*" for every device call; "@gpu" limits it to one GPU index
 *   FAKE_NVML_STATE          a file holding the locked clocks, shared by every process that
 *                            loads the double (as the real driver keeps locks after the process
 *                            that set them exits). One line per GPU:
 *                            "<index> <locked 0|1> <min_mhz> <max_mhz> <writes>"; writes counts
 *                            the set/reset calls that reached the "hardware".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_UNKNOWN = 999,
};
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2 };

#define MAX_GPUS 16
#define MAX_MEM_CLOCKS 8

struct fake_device {
    unsigned index;
};
typedef struct fake_device *nvmlDevice_t;

struct lock_state {
    int locked;
    unsigned min_mhz, max_mhz;
    unsigned long writes;
};

static struct fake_device devices[MAX_GPUS];
static struct lock_state memory_state[MAX_GPUS]; /* used when FAKE_NVML_STATE is unset */
static double energy_mj[MAX_GPUS];
static struct timespec energy_at[MAX_GPUS];
static int init_count;
static unsigned gpu_count = 1;
static unsigned clk_max = 1410, clk_min = 210, clk_step = 15;
static unsigned mem_clocks[MAX_MEM_CLOCKS] = {1215, 405};
static unsigned n_mem_clocks = 2;
static unsigned power_limit_mw = 400000;

/* ---- configuration ------------------------------------------------------------------------ */

static unsigned env_uint(const char *name, unsigned fallback) {
    const char *v = getenv(name);
    return (v && *v) ? (unsigned)strtoul(v, NULL, 10) : fallback;
}

static void load_config(void) {
    gpu_count = env_uint("FAKE_NVML_GPU_COUNT", 1);
    if (gpu_count > MAX_GPUS) gpu_count = MAX_GPUS;
    power_limit_mw = env_uint("FAKE_NVML_POWER_LIMIT_MW", 400000);
    const char *clocks = getenv("FAKE_NVML_CLOCKS");
    if (!clocks || sscanf(clocks, "%u:%u:%u", &clk_max, &clk_min, &clk_step) != 3 ||
        clk_step == 0 || clk_min > clk_max) {
        clk_max = 1410, clk_min = 210, clk_step = 15;
    }
    const char *mem = getenv("FAKE_NVML_MEM_CLOCKS");
    if (!mem || !*mem) mem = "1215,405";
    n_mem_clocks = 0;
    for (const char *p = mem; *p && n_mem_clocks < MAX_MEM_CLOCKS;) {
        char *end;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p) break;
        mem_clocks[n_mem_clocks++] = (unsigned)v;
        p = (*end == ',') ? end + 1 : end;
    }
    for (unsigned i = 0; i < MAX_GPUS; i++) {
        devices[i].index = i;
        energy_mj[i] = 0.0;
        clock_gettime(CLOCK_MONOTONIC, &energy_at[i]);
    }
}

/* The code FAKE_NVML_FAIL forces on `fn` for GPU `gpu` (-1: not a device call), 0 if none. */
static nvmlReturn_t forced(const char *fn, int gpu) {
    const char *spec = getenv("FAKE_NVML_FAIL");
    if (!spec || !*spec) return NVML_SUCCESS;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) continue;
        *eq = '\0';
        int only_gpu = -1;
        char *at = strchr(tok, '@');
        if (at) {
            *at = '\0';
            only_gpu = atoi(at + 1);
        }
        int name_ok = strcmp(tok, fn) == 0 || (strcmp(tok, "*") == 0 && gpu >= 0);
        int gpu_ok = only_gpu < 0 || only_gpu == gpu;
        if (name_ok && gpu_ok) return (nvmlReturn_t)atoi(eq + 1);
    }
    return NVML_SUCCESS;
}

/* ---- lock state, in memory or shared through FAKE_NVML_STATE ------------------------------ */

static void read_state(struct lock_state *out) {
    const char *path = getenv("FAKE_NVML_STATE");
    if (!path || !*path) {
        memcpy(out, memory_state, sizeof memory_state);
        return;
    }
    memset(out, 0, MAX_GPUS * sizeof *out);
    FILE *f = fopen(path, "r");
    if (!f) return;
    unsigned idx, min_mhz, max_mhz;
    int locked;
    unsigned long writes;
    while (fscanf(f, "%u %d %u %u %lu", &idx, &locked, &min_mhz, &max_mhz, &writes) == 5) {
        if (idx < MAX_GPUS) {
            out[idx].locked = locked;
            out[idx].min_mhz = min_mhz;
            out[idx].max_mhz = max_mhz;
            out[idx].writes = writes;
        }
    }
    fclose(f);
}

/* Read-modify-write of one GPU's lock under an exclusive lock file; the state file itself is
 * replaced by rename so a reader in another process never sees half a file. */
static nvmlReturn_t write_lock(unsigned idx, int locked, unsigned min_mhz, unsigned max_mhz) {
    const char *path = getenv("FAKE_NVML_STATE");
    int lock_fd = -1;
    char lock_path[4096], tmp_path[4096];
    if (path && *path) {
        snprintf(lock_path, sizeof lock_path, "%s.lock", path);
        lock_fd = open(lock_path, O_CREAT | O_RDWR, 0600);
        if (lock_fd < 0 || flock(lock_fd, LOCK_EX) != 0) return NVML_ERROR_UNKNOWN;
    }
    struct lock_state state[MAX_GPUS];
    read_state(state);
    state[idx].locked = locked;
    state[idx].min_mhz = locked ? min_mhz : 0;
    state[idx].max_mhz = locked ? max_mhz : 0;
    state[idx].writes += 1;
    memcpy(memory_state, state, sizeof state);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (lock_fd >= 0) {
        snprintf(tmp_path, sizeof tmp_path, "%s.tmp%d", path, (int)getpid());
        FILE *f = fopen(tmp_path, "w");
        if (!f) {
            ret = NVML_ERROR_UNKNOWN;
        } else {
            unsigned n = gpu_count;
            for (unsigned i = 0; i < n; i++) {
                fprintf(f, "%u %d %u %u %lu\n", i, state[i].locked, state[i].min_mhz,
                        state[i].max_mhz, state[i].writes);
            }
            if (fclose(f) != 0 || rename(tmp_path, path) != 0) ret = NVML_ERROR_UNKNOWN;
        }
        close(lock_fd); /* releases the flock */
    }
    return ret;
}

/* ---- helpers -------------------------------------------------------------------------------- */

static int device_index(nvmlDevice_t d) {
    if (d < devices || d >= devices + gpu_count) return -1;
    return (int)(d - devices);
}

/* Common prologue of a device call: initialised, valid handle, no forced failure. */
#define DEVICE_CALL(name, dev, idx_var)                                  \
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;                \
    int idx_var = device_index(dev);                                     \
    if (idx_var < 0) return NVML_ERROR_INVALID_ARGUMENT;                 \
    {                                                                    \
        nvmlReturn_t f_ = forced(name, idx_var);                         \
        if (f_ != NVML_SUCCESS) return f_;                               \
    }

static unsigned max_mem_clock(void) {
    unsigned m = 0;
    for (unsigned i = 0; i < n_mem_clocks; i++) m = mem_clocks[i] > m ? mem_clocks[i] : m;
    return m;
}

static unsigned current_sm_clock(int idx) {
    struct lock_state state[MAX_GPUS];
    read_state(state);
    /* The double is always "loaded": a locked GPU runs at its lock's upper bound. */
    return state[idx].locked ? state[idx].max_mhz : clk_max;
}

static unsigned power_mw_at(unsigned clock_mhz) {
    return 60000u + (unsigned)(340000.0 * clock_mhz / clk_max);
}

static nvmlReturn_t write_prologue(void) {
    if (getenv("FAKE_NVML_PRIVILEGED") && strcmp(getenv("FAKE_NVML_PRIVILEGED"), "0") == 0)
        return NVML_ERROR_NO_PERMISSION;
    unsigned delay_us = env_uint("FAKE_NVML_SET_DELAY_US", 0);
    if (delay_us) usleep(delay_us);
    return NVML_SUCCESS;
}

/* ---- test hooks (not NVML): let an in-process test start clean and check shutdowns ---------- */

void fake_nvml_reset(void) {
    init_count = 0;
    memset(memory_state, 0, sizeof memory_state);
}

int fake_nvml_init_count(void) { return init_count; }

/* ---- library ------------------------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    nvmlReturn_t f = forced("nvmlInitWithFlags", -1);
    if (f != NVML_SUCCESS) return f;
    if (init_count == 0) load_config();
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 12: return "NVML Shared Library Not Found";
    case 15: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t f = forced("nvmlSystemGetDriverVersion", -1);
    if (f != NVML_SUCCESS) return f;
    const char *v = "550.00-fake";
    if (!version || length < strlen(v) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(version, v);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t f = forced("nvmlDeviceGetCount_v2", -1);
    if (f != NVML_SUCCESS) return f;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t f = forced("nvmlDeviceGetHandleByIndex_v2", (int)index);
    if (f != NVML_SUCCESS) return f;
    if (index >= gpu_count || !device) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

/* ---- device -------------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEVICE_CALL("nvmlDeviceGetName", device, idx);
    const char *n = "Fake NVIDIA A100-SXM4-40GB";
    if (!name || length < strlen(n) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(name, n);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    DEVICE_CALL("nvmlDeviceGetIndex", device, idx);
    *index = (unsigned)idx;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count,
                                                 unsigned int *clocks_mhz) {
    DEVICE_CALL("nvmlDeviceGetSupportedMemoryClocks", device, idx);
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (!clocks_mhz || *count < n_mem_clocks) {
        *count = n_mem_clocks;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(clocks_mhz, mem_clocks, n_mem_clocks * sizeof *clocks_mhz);
    *count = n_mem_clocks;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t device, unsigned int mem_mhz,
                                                   unsigned int *count, unsigned int *clocks_mhz) {
    DEVICE_CALL("nvmlDeviceGetSupportedGraphicsClocks", device, idx);
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    int known = 0;
    for (unsigned i = 0; i < n_mem_clocks; i++) known |= mem_clocks[i] == mem_mhz;
    if (!known) return NVML_ERROR_NOT_FOUND;
    unsigned top = clk_max;
    if (mem_mhz != max_mem_clock()) top = clk_min + ((clk_max - clk_min) / 2 / clk_step) * clk_step;
    unsigned n = (top - clk_min) / clk_step + 1;
    if (!clocks_mhz || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < n; i++) clocks_mhz[i] = top - i * clk_step;
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int *clock_mhz) {
    DEVICE_CALL("nvmlDeviceGetClockInfo", device, idx);
    if (!clock_mhz) return NVML_ERROR_INVALID_ARGUMENT;
    if (type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS) *clock_mhz = current_sm_clock(idx);
    else if (type == NVML_CLOCK_MEM) *clock_mhz = max_mem_clock();
    else return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, int type, unsigned int *clock_mhz) {
    DEVICE_CALL("nvmlDeviceGetMaxClockInfo", device, idx);
    if (!clock_mhz) return NVML_ERROR_INVALID_ARGUMENT;
    if (type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS) *clock_mhz = clk_max;
    else if (type == NVML_CLOCK_MEM) *clock_mhz = max_mem_clock();
    else return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t device, unsigned int min_mhz,
                                          unsigned int max_mhz) {
    DEVICE_CALL("nvmlDeviceSetGpuLockedClocks", device, idx);
    nvmlReturn_t r = write_prologue();
    if (r != NVML_SUCCESS) return r;
    if (min_mhz > max_mhz || min_mhz < clk_min || max_mhz > clk_max)
        return NVML_ERROR_INVALID_ARGUMENT;
    return write_lock((unsigned)idx, 1, min_mhz, max_mhz);
}

nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t device) {
    DEVICE_CALL("nvmlDeviceResetGpuLockedClocks", device, idx);
    nvmlReturn_t r = write_prologue();
    if (r != NVML_SUCCESS) return r;
    return write_lock((unsigned)idx, 0, 0, 0);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power_mw) {
    DEVICE_CALL("nvmlDeviceGetPowerUsage", device, idx);
    if (!power_mw) return NVML_ERROR_INVALID_ARGUMENT;
    *power_mw = power_mw_at(current_sm_clock(idx));
    return NVML_SUCCESS;
}

/* Energy integrates the current power over the time since the last read (per process). */
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                 unsigned long long *energy) {
    DEVICE_CALL("nvmlDeviceGetTotalEnergyConsumption", device, idx);
    if (!energy) return NVML_ERROR_INVALID_ARGUMENT;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double dt_s = (double)(now.tv_sec - energy_at[idx].tv_sec) +
                  (double)(now.tv_nsec - energy_at[idx].tv_nsec) / 1e9;
    energy_mj[idx] += power_mw_at(current_sm_clock(idx)) * dt_s;
    energy_at[idx] = now;
    *energy = (unsigned long long)energy_mj[idx];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit_mw) {
    DEVICE_CALL("nvmlDeviceGetEnforcedPowerLimit", device, idx);
    if (!limit_mw) return NVML_ERROR_INVALID_ARGUMENT;
    *limit_mw = power_limit_mw;
    return NVML_SUCCESS;
}
