/*
 * aattsfs._passthrough: FUSE passthrough for a pyfuse3 that has no call for it.
 *
 * Written for aattsfs from libfuse's public headers (docs/passthrough.md).
 * pyfuse3 calls two libfuse functions that matter here; this module, loaded
 * with RTLD_GLOBAL before pyfuse3, defines both, so pyfuse3's calls reach
 * these definitions first:
 *
 *   fuse_session_new_versioned  the operations table is copied and its init
 *                               wrapped: after pyfuse3's own init, the
 *                               wrapper asks for FUSE_CAP_PASSTHROUGH (when
 *                               asked to and the kernel offers it);
 *   fuse_reply_open             an open reply whose fh carries a backing id
 *                               in its high 32 bits (the daemon's protocol,
 *                               see fs.py) is sent as a passthrough open,
 *                               a directory's with the top bit set lets
 *                               the kernel cache the listing; every reply
 *                               gets noflush when asked for.
 *
 * The real functions are looked up in the libfuse that pyfuse3 loaded (found
 * among the loaded objects by name), never in another one, and only a
 * libfuse of 3.17 or later is touched at all: below that, pyfuse3 calls the
 * old fuse_session_new, no session is hooked and replies pass unchanged.
 * Backing ids come from ioctls on the session's /dev/fuse descriptor.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 312  /* an API level 3.14 and 3.17 both have; Python.h sets _GNU_SOURCE */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <fuse3/fuse_lowlevel.h>

#ifdef FUSE_CAP_PASSTHROUGH
#define HAVE_PASSTHROUGH 1

/* The kernel's ioctls (include/uapi/linux/fuse.h, Linux 6.9). */
struct backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
#define BACKING_OPEN _IOW(229, 1, struct backing_map)
#define BACKING_CLOSE _IOW(229, 2, uint32_t)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
					       size_t, struct libfuse_version *, void *);
typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*session_fd_fn)(struct fuse_session *);
typedef int (*version_fn)(void);

static struct {
	void *lib;                    /* the libfuse pyfuse3 loaded */
	reply_open_fn reply_open;
	struct fuse_lowlevel_ops ops; /* pyfuse3's table, init wrapped */
	void (*init)(void *, struct fuse_conn_info *);
	struct fuse_session *se;      /* set once the session is made through us */
	int want;                     /* ask for passthrough at INIT */
	int noflush;                  /* noflush on every open reply */
	int init_seen, capable, granted, runtime_version;
	char libpath[512];
} g;

static int find_libfuse(struct dl_phdr_info *info, size_t size, void *data)
{
	(void)size; (void)data;
	const char *base = strrchr(info->dlpi_name, '/');
	base = base ? base + 1 : info->dlpi_name;
	if (strncmp(base, "libfuse3.so", 11) == 0) {
		snprintf(g.libpath, sizeof(g.libpath), "%s", info->dlpi_name);
		return 1;
	}
	return 0;
}

/* The libfuse in this process (pyfuse3's), opened without loading anything. */
static void *libfuse(void)
{
	if (!g.lib && dl_iterate_phdr(find_libfuse, NULL))
		g.lib = dlopen(g.libpath, RTLD_LAZY | RTLD_NOLOAD);
	return g.lib;
}

static void *real(const char *name)
{
	void *lib = libfuse();
	return lib ? dlsym(lib, name) : NULL;
}

static void wrapped_init(void *userdata, struct fuse_conn_info *conn)
{
	if (g.init)
		g.init(userdata, conn);
	g.init_seen = 1;
	g.capable = (conn->capable & FUSE_CAP_PASSTHROUGH) != 0;
	/* Through `want` only: pyfuse3 edits `want`, and libfuse refuses an
	 * init that changed both `want` and `want_ext`. A bit the kernel does
	 * not offer would fail the whole INIT: ask only when it is offered. */
	if (g.want && g.capable) {
		conn->want |= FUSE_CAP_PASSTHROUGH;
		conn->max_backing_stack_depth = FUSE_BACKING_STACKED_UNDER;
		g.granted = 1;
	}
}

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
						const struct fuse_lowlevel_ops *op, size_t op_size,
						struct libfuse_version *version, void *userdata)
{
	session_new_fn fn = (session_new_fn)real("fuse_session_new_versioned");
	version_fn ver = (version_fn)real("fuse_version");
	if (!fn) {
		errno = ENOSYS;
		return NULL;
	}
	g.runtime_version = ver ? ver() : 0;
	if (g.runtime_version < 317 || op_size > sizeof(g.ops))
		return fn(args, op, op_size, version, userdata);
	memset(&g.ops, 0, sizeof(g.ops));
	memcpy(&g.ops, op, op_size);
	g.init = g.ops.init;
	g.ops.init = wrapped_init;
	g.se = fn(args, &g.ops, op_size, version, userdata);
	return g.se;
}

__attribute__((visibility("default")))
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *f)
{
	if (!g.reply_open)
		g.reply_open = (reply_open_fn)real("fuse_reply_open");
	if (!g.reply_open)
		return -ENOSYS;
	if (!g.se)  /* not our session (or an older libfuse): hands off */
		return g.reply_open(req, f);
	struct fuse_file_info fi = *f;
	int32_t backing = (int32_t)(fi.fh >> 32);
	if (backing > 0) {
		/* A passthrough open carries nothing else the kernel would refuse. */
		fi.backing_id = backing;
		fi.keep_cache = 0;
		fi.direct_io = 0;
	} else if (fi.fh >> 63) {
		/* A listing the daemon invalidates when it changes (fs.py, opendir) */
		fi.cache_readdir = 1;
		fi.keep_cache = 1;
	}
	if (g.noflush)
		fi.noflush = 1;
	return g.reply_open(req, &fi);
}

static int session_fd(void)
{
	session_fd_fn fn = (session_fd_fn)real("fuse_session_fd");
	return g.se && fn ? fn(g.se) : -1;
}
#endif /* FUSE_CAP_PASSTHROUGH */

static PyObject *py_configure(PyObject *self, PyObject *args)
{
	(void)self;
	int want, noflush;
	if (!PyArg_ParseTuple(args, "pp", &want, &noflush))
		return NULL;
#ifdef HAVE_PASSTHROUGH
	g.want = want;
	g.noflush = noflush;
#endif
	Py_RETURN_NONE;
}

static PyObject *py_state(PyObject *self, PyObject *unused)
{
	(void)self; (void)unused;
#ifdef HAVE_PASSTHROUGH
	return Py_BuildValue("{s:i,s:i,s:O,s:O,s:O,s:O,s:i,s:s}",
			     "headers", FUSE_MAJOR_VERSION * 100 + FUSE_MINOR_VERSION,
			     "compiled", 1,
			     "hooked", g.se ? Py_True : Py_False,
			     "init_seen", g.init_seen ? Py_True : Py_False,
			     "capable", g.capable ? Py_True : Py_False,
			     "granted", g.granted ? Py_True : Py_False,
			     "runtime_version", g.runtime_version,
			     "library", g.libpath);
#else
	return Py_BuildValue("{s:i,s:i}", "headers", FUSE_MAJOR_VERSION * 100 + FUSE_MINOR_VERSION,
			     "compiled", 0);
#endif
}

static PyObject *py_backing_open(PyObject *self, PyObject *args)
{
	(void)self;
	int fd;
	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
#ifdef HAVE_PASSTHROUGH
	int dev = session_fd();
	if (dev < 0) {
		errno = EBADF;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	struct backing_map map = {.fd = fd, .flags = 0, .padding = 0};
	int id;
	Py_BEGIN_ALLOW_THREADS
	id = ioctl(dev, BACKING_OPEN, &map);
	Py_END_ALLOW_THREADS
	if (id < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	return PyLong_FromLong(id);
#else
	errno = ENOSYS;
	return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

static PyObject *py_backing_close(PyObject *self, PyObject *args)
{
	(void)self;
	unsigned int id;
	if (!PyArg_ParseTuple(args, "I", &id))
		return NULL;
#ifdef HAVE_PASSTHROUGH
	int dev = session_fd();
	uint32_t arg = id;
	if (dev < 0 || ioctl(dev, BACKING_CLOSE, &arg) < 0) {
		if (dev < 0)
			errno = EBADF;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
#else
	errno = ENOSYS;
	return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

static PyMethodDef methods[] = {
	{"configure", py_configure, METH_VARARGS,
	 "configure(want, noflush): before the mount, whether INIT asks for passthrough "
	 "and whether open replies carry noflush."},
	{"state", py_state, METH_NOARGS, "What was compiled, hooked and negotiated."},
	{"backing_open", py_backing_open, METH_VARARGS,
	 "backing_open(fd) -> backing id for a passthrough open (FUSE_DEV_IOC_BACKING_OPEN)."},
	{"backing_close", py_backing_close, METH_VARARGS,
	 "backing_close(id): release a backing id (FUSE_DEV_IOC_BACKING_CLOSE)."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "aattsfs._passthrough",
	"FUSE passthrough hooks for pyfuse3 (docs/passthrough.md).", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__passthrough(void)
{
	return PyModule_Create(&module);
}
