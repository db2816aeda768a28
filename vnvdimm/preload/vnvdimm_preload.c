/*
 * vnvdimm's preload library: what a FUSE file system cannot do for the emulated /dev.
 *
 * The daemon serves /dev/ndctlN, /dev/nmemN, /dev/daxR.M and /dev/pmemN[s] as regular files,
 * each with an extended attribute "user.vnvdimm" that says what the kernel's node would be:
 *
 *     "<c|b> <major>:<minor> <name> <align> <socket>"
 *
 * For files that carry it (and only those: real device nodes and every other file are left
 * alone), this library, loaded with LD_PRELOAD:
 *
 *  - makes the stat family report a character or block device with that major:minor;
 *  - forwards ioctl() to the daemon over the unix socket named there. The daemon sizes the
 *    command's buffer as the kernel does and asks for the bytes it needs: this library only
 *    copies bytes between the caller's memory and the socket, with process_vm_readv/writev
 *    so that a bad pointer becomes EFAULT, as copy_from_user() makes it, not a crash;
 *  - refuses mmap() of a device-dax file that device-dax's check_vma() refuses (EINVAL).
 *
 * Statically linked programs and raw syscall()s bypass all of this.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#define XATTR_NAME "user.vnvdimm"
#define WIRE_MAGIC 0x564e5644u /* "VNVD" */
#define WIRE_VERSION 1u
#define OP_READ 1u
#define OP_WRITE 2u
#define OP_DONE 3u
#define MAX_TRANSFER ((4u << 20) + 4096) /* ND_IOCTL_MAX_BUFLEN and a little: the daemon asks no more */

struct node {
	char type; /* 'c' or 'b' */
	unsigned int major, minor;
	char name[64];
	unsigned long long align;
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

struct wire_request {
	uint32_t magic, version, request, accmode;
	char name[64];
};

struct wire_op {
	uint32_t op, pad;
	uint64_t offset, length;
};

static void *libc_next(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

#define REAL(ret, name, ...)                                                  \
	static ret (*real_##name)(__VA_ARGS__);                                 \
	if (!real_##name)                                                       \
		real_##name = (ret (*)(__VA_ARGS__))libc_next(#name)

/* ------------------------------------------------------------------ the node attribute */

static int parse_node(const char *buf, ssize_t n, struct node *node)
{
	char text[512];

	if (n <= 0 || n >= (ssize_t)sizeof(text))
		return 0;
	memcpy(text, buf, n);
	text[n] = '\0';
	memset(node, 0, sizeof(*node));
	if (sscanf(text, "%c %u:%u %63s %llu %107s", &node->type, &node->major, &node->minor,
		   node->name, &node->align, node->socket) != 6)
		return 0;
	return node->type == 'c' || node->type == 'b';
}

static int node_of_fd(int fd, struct node *node)
{
	char buf[512];
	int saved = errno;
	ssize_t n = fgetxattr(fd, XATTR_NAME, buf, sizeof(buf));

	errno = saved;
	return parse_node(buf, n, node);
}

/* The node behind (dirfd, path) as the stat call resolved it (following a final symlink or not). */
static int node_of_path(int dirfd, const char *path, int nofollow, struct node *node)
{
	char proc[64], buf[512];
	int saved = errno, fd, ok = 0;
	ssize_t n;

	if (path[0] == '\0')
		return node_of_fd(dirfd, node);
	if (dirfd == AT_FDCWD || path[0] == '/') {
		n = nofollow ? lgetxattr(path, XATTR_NAME, buf, sizeof(buf)) : getxattr(path, XATTR_NAME, buf, sizeof(buf));
		errno = saved;
		return parse_node(buf, n, node);
	}
	fd = openat(dirfd, path, O_PATH | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0));
	if (fd >= 0) {
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		n = getxattr(proc, XATTR_NAME, buf, sizeof(buf));
		ok = parse_node(buf, n, node);
		close(fd);
	}
	errno = saved;
	return ok;
}

/* Only regular files of an anonymous-device file system (FUSE is one) can be ours. */
static int candidate(mode_t mode, dev_t dev)
{
	return S_ISREG(mode) && major(dev) == 0;
}

static mode_t node_mode(const struct node *node, mode_t mode)
{
	return (mode & 07777) | (node->type == 'c' ? S_IFCHR : S_IFBLK);
}

static void fix_stat(struct stat *st, const struct node *node)
{
	st->st_mode = node_mode(node, st->st_mode);
	st->st_rdev = makedev(node->major, node->minor);
	st->st_size = 0;
	st->st_blocks = 0;
}

/* ------------------------------------------------------------------ the stat family */

static int stat_at(int dirfd, const char *path, struct stat *st, int flags)
{
	struct node node;
	REAL(int, fstatat, int, const char *, struct stat *, int);
	int rc = real_fstatat(dirfd, path, st, flags);

	if (rc == 0 && candidate(st->st_mode, st->st_dev) &&
	    node_of_path(dirfd, path, flags & AT_SYMLINK_NOFOLLOW, &node))
		fix_stat(st, &node);
	return rc;
}

static int stat_fd(int fd, struct stat *st)
{
	struct node node;
	REAL(int, fstat, int, struct stat *);
	int rc = real_fstat(fd, st);

	if (rc == 0 && candidate(st->st_mode, st->st_dev) && node_of_fd(fd, &node))
		fix_stat(st, &node);
	return rc;
}

int stat(const char *path, struct stat *st) { return stat_at(AT_FDCWD, path, st, 0); }
int stat64(const char *path, struct stat64 *st) { return stat_at(AT_FDCWD, path, (struct stat *)st, 0); }
int lstat(const char *path, struct stat *st) { return stat_at(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW); }
int lstat64(const char *path, struct stat64 *st)
{
	return stat_at(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}
int fstat(int fd, struct stat *st) { return stat_fd(fd, st); }
int fstat64(int fd, struct stat64 *st) { return stat_fd(fd, (struct stat *)st); }
int fstatat(int dirfd, const char *path, struct stat *st, int flags) { return stat_at(dirfd, path, st, flags); }
int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return stat_at(dirfd, path, (struct stat *)st, flags);
}

/* Binaries built against glibc < 2.33 call these (x86_64: one struct layout for every version). */
int __xstat(int ver, const char *path, struct stat *st) { (void)ver; return stat_at(AT_FDCWD, path, st, 0); }
int __xstat64(int ver, const char *path, struct stat64 *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, (struct stat *)st, 0);
}
int __lxstat(int ver, const char *path, struct stat *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}
int __lxstat64(int ver, const char *path, struct stat64 *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}
int __fxstat(int ver, int fd, struct stat *st) { (void)ver; return stat_fd(fd, st); }
int __fxstat64(int ver, int fd, struct stat64 *st) { (void)ver; return stat_fd(fd, (struct stat *)st); }
int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	(void)ver;
	return stat_at(dirfd, path, st, flags);
}
int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	(void)ver;
	return stat_at(dirfd, path, (struct stat *)st, flags);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
	struct node node;
	REAL(int, statx, int, const char *, int, unsigned int, struct statx *);
	int rc = real_statx(dirfd, path, flags, mask, stx);

	if (rc == 0 && (stx->stx_mask & STATX_TYPE) &&
	    candidate(stx->stx_mode, makedev(stx->stx_dev_major, stx->stx_dev_minor)) &&
	    node_of_path(dirfd, path, flags & AT_SYMLINK_NOFOLLOW, &node)) {
		stx->stx_mode = node_mode(&node, stx->stx_mode);
		stx->stx_rdev_major = node.major;
		stx->stx_rdev_minor = node.minor;
		stx->stx_size = 0;
		stx->stx_blocks = 0;
	}
	return rc;
}

/* ------------------------------------------------------------------ ioctl forwarding */

/* All of len bytes through the socket, one way or the other. */
static int transfer(int sock, void *buf, size_t len, int sending)
{
	char *p = buf;

	while (len) {
		ssize_t n = sending ? send(sock, p, len, MSG_NOSIGNAL) : recv(sock, p, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= n;
	}
	return 0;
}

static int send_all(int sock, const void *buf, size_t len) { return transfer(sock, (void *)buf, len, 1); }
static int recv_all(int sock, void *buf, size_t len) { return transfer(sock, buf, len, 0); }

/* Copy between our own memory and a buffer without trusting the pointer: EFAULT, not SIGSEGV. */
static uint32_t user_copy(char *local, char *user, size_t n, int to_user)
{
	struct iovec l = { local, n }, r = { user, n };
	ssize_t done = to_user ? process_vm_writev(getpid(), &l, 1, &r, 1, 0)
			       : process_vm_readv(getpid(), &l, 1, &r, 1, 0);

	return done == (ssize_t)n ? 0 : EFAULT;
}

/* READ: a status, then (if 0) the bytes; WRITE: the bytes come, then our status. */
static int serve_op(int sock, const struct wire_op *op, char *arg)
{
	uint32_t status;
	int rc = -1;
	char *buf;

	if (op->length > MAX_TRANSFER)
		return -1;
	buf = malloc(op->length ? op->length : 1);
	if (!buf)
		return -1;
	if (op->op == OP_READ) {
		status = user_copy(buf, arg + op->offset, op->length, 0);
		rc = send_all(sock, &status, sizeof(status));
		if (!rc && !status)
			rc = send_all(sock, buf, op->length);
	} else if (!recv_all(sock, buf, op->length)) {
		status = user_copy(buf, arg + op->offset, op->length, 1);
		rc = send_all(sock, &status, sizeof(status));
	}
	free(buf);
	return rc;
}

static int forward_ioctl(int fd, const struct node *node, unsigned long request, char *arg)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct wire_request req = { WIRE_MAGIC, WIRE_VERSION, (uint32_t)request, 0, { 0 } };
	struct wire_op op;
	int sock, flags = fcntl(fd, F_GETFL);

	if (flags < 0)
		return -1;
	req.accmode = flags & O_ACCMODE;
	snprintf(req.name, sizeof(req.name), "%s", node->name);
	snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", node->socket);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return -1;
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) || send_all(sock, &req, sizeof(req)))
		goto gone;
	for (;;) {
		if (recv_all(sock, &op, sizeof(op)))
			goto gone;
		if (op.op == OP_DONE) {
			close(sock);
			if (op.offset) {
				errno = (int)op.offset;
				return -1;
			}
			return (int)op.length;
		}
		if ((op.op != OP_READ && op.op != OP_WRITE) || serve_op(sock, &op, arg))
			goto gone;
	}
gone:
	/* the daemon is gone: as if its device had been removed under the open file */
	close(sock);
	errno = ENXIO;
	return -1;
}

int ioctl(int fd, unsigned long request, ...)
{
	struct node node;
	va_list ap;
	char *arg;
	REAL(int, ioctl, int, unsigned long, ...);

	va_start(ap, request);
	arg = va_arg(ap, char *);
	va_end(ap);
	if (node_of_fd(fd, &node))
		return forward_ioctl(fd, &node, request, arg);
	return real_ioctl(fd, request, arg);
}

/* ------------------------------------------------------------------ device-dax mmap checks */

static int dax_refuses(int fd, void *addr, size_t length, int flags, off_t offset)
{
	struct node node;
	unsigned long long mask;

	if ((flags & MAP_ANONYMOUS) || fd < 0 || !node_of_fd(fd, &node))
		return 0;
	if (node.type != 'c' || strncmp(node.name, "dax", 3) != 0 || node.align == 0)
		return 0;
	if ((flags & MAP_TYPE) == MAP_PRIVATE)
		return 1; /* check_vma(): "attempted private mapping" */
	mask = node.align - 1;
	/* the mapping starts where get_unmapped_area() puts offset on an align boundary */
	return ((unsigned long long)offset & mask) || ((unsigned long long)length & mask) ||
	       ((flags & MAP_FIXED) && ((unsigned long long)(uintptr_t)addr & mask));
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	REAL(void *, mmap, void *, size_t, int, int, int, off_t);

	if (dax_refuses(fd, addr, length, flags, offset)) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	return real_mmap(addr, length, prot, flags, fd, offset);
}

void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off64_t offset)
{
	return mmap(addr, length, prot, flags, fd, offset);
}
