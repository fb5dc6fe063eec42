package server

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"blindperso/api"
	"blindperso/batch"
	"blindperso/issuer"
)

// upload takes multipart/form-data with a part "manifest" (the station's
// FILE.manifest.json) followed by a part "batch" (the NDJSON file),
// spools the batch to the upload directory, imports it and answers the
// report.
func (h *Handler) upload(w http.ResponseWriter, r *http.Request) {
	max := h.cfg.MaxBatchBytes
	r.Body = http.MaxBytesReader(w, r.Body, max+maxManifestBytes+64<<10)
	mr, err := r.MultipartReader()
	if err != nil {
		writeError(w, http.StatusBadRequest, "want multipart/form-data", "parts: manifest (the batch's .manifest.json), then batch (the NDJSON file): "+err.Error())
		return
	}
	tooLarge := func(err error) bool {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "upload too large", fmt.Sprintf("a batch may be at most %d bytes", max))
			return true
		}
		return false
	}
	part, err := mr.NextPart()
	if err != nil || part.FormName() != "manifest" {
		if err == nil || !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "the first part must be \"manifest\"", "parts: manifest, then batch")
		}
		return
	}
	mraw, err := io.ReadAll(io.LimitReader(part, maxManifestBytes+1))
	if err != nil {
		if !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "could not read the manifest part", err.Error())
		}
		return
	}
	if len(mraw) > maxManifestBytes {
		writeError(w, http.StatusRequestEntityTooLarge, "manifest too large", fmt.Sprintf("at most %d bytes", maxManifestBytes))
		return
	}
	m, err := batch.ParseManifest(mraw)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad manifest", err.Error())
		return
	}
	if m.Bytes > max {
		writeError(w, http.StatusRequestEntityTooLarge, "batch too large", fmt.Sprintf("the manifest says %d bytes; a batch may be at most %d", m.Bytes, max))
		return
	}
	part, err = mr.NextPart()
	if err != nil || part.FormName() != "batch" {
		if err == nil || !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "the second part must be \"batch\"", "parts: manifest, then batch")
		}
		return
	}
	dir, err := os.MkdirTemp(h.cfg.UploadDir, "upload-")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer os.RemoveAll(dir)
	// The batch is spooled under the name its manifest gives it (a plain
	// file name: batch.ParseManifest), which the import checks.
	path := filepath.Join(dir, m.Batch)
	if err := os.WriteFile(batch.ManifestPath(path), mraw, 0o600); err != nil {
		h.fail(w, r, err)
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	n, err := io.Copy(f, io.LimitReader(part, max+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if !tooLarge(err) {
			writeError(w, http.StatusBadRequest, "could not read the batch part", err.Error())
		}
		return
	}
	if n > max {
		writeError(w, http.StatusRequestEntityTooLarge, "batch too large", fmt.Sprintf("a batch may be at most %d bytes", max))
		return
	}
	lat := h.m.tokenLatency.WithLabelValues("import")
	im := &issuer.Importer{Issuer: h.cfg.Issuer, Store: h.cfg.Store, Workers: h.cfg.Workers, Attest: h.cfg.Attest, Log: h.log,
		TokenTime: func(d time.Duration) { lat.Observe(d.Seconds()) }}
	ctx := r.Context()
	rep, ierr := im.ImportFile(ctx, path)
	if ierr != nil {
		var br *issuer.BatchRefusedError
		if errors.As(ierr, &br) {
			h.m.batches.WithLabelValues(api.BatchRefused).Inc()
			h.log.Warn("batch refused", "batch", hex.EncodeToString(m.SHA256), "reason", br.Reason)
		} else {
			h.m.batches.WithLabelValues(batchError).Inc()
		}
		h.fail(w, r, ierr)
		return
	}
	h.m.batches.WithLabelValues(api.BatchDone).Inc()
	h.m.imported.Add(float64(rep.Imported))
	h.m.rejects.Add(float64(rep.Rejects))
	h.m.conflicts.Add(float64(rep.Conflicts))
	h.m.unattested.Add(float64(rep.Unattested))
	h.log.Info("batch imported", "batch", rep.ID, "records", rep.Records, "imported", rep.Imported,
		"unattested", rep.Unattested, "duplicates", rep.Duplicates, "conflicts", rep.Conflicts, "rejects", rep.Rejects)
	d, err := issuer.Detail(ctx, h.cfg.Store, rep)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (h *Handler) batch(w http.ResponseWriter, r *http.Request) {
	id := strings.ToLower(r.PathValue("id"))
	if b, err := hex.DecodeString(id); err != nil || len(b) != sha256.Size {
		writeError(w, http.StatusBadRequest, "bad batch id", "a batch id is the batch file's SHA-256 in hex (64 digits)")
		return
	}
	rep, err := h.cfg.Store.Batch(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	d, err := issuer.Detail(r.Context(), h.cfg.Store, rep)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

func (h *Handler) batches(w http.ResponseWriter, r *http.Request) {
	bs, err := h.cfg.Store.Batches(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if bs == nil {
		bs = []api.Batch{}
	}
	writeJSON(w, http.StatusOK, bs)
}
