package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/issuer"
)

func batchesCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "batches",
		Short: "List imported batches and show one with its rejects and conflicts",
		Long: `A batch is named by its SHA-256 (the id issuer import prints). Its report
has the counts of the last import run (records, imported, duplicates,
conflicts, rejects) and its status: importing (an import is running, or
was interrupted: run it again), done, or refused (the file did not match
its manifest, or is for another issuer key; reason given).`,
	}
	c.AddCommand(batchesListCmd(), batchesShowCmd())
	return c
}

func batchesListCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "list [--db DIR|DSN] [--json]",
		Short: "List the batches, oldest first",
		Long: `One line per batch: its id (SHA-256), status, when it was first seen, and
the counts of its last import. A batch still "importing" with no import
running was interrupted: import it again (nothing is imported twice).`,
		Example: `  issuer batches list --db /var/lib/blindperso-issuer`,
		Args:    cobra.NoArgs,
	}
	openStore := dbFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print a JSON array of batch reports")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		st, err := openStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		bs, err := st.Batches(cmd.Context())
		if err != nil {
			return err
		}
		if asJSON {
			if bs == nil {
				bs = []issuer.BatchReport{}
			}
			return printJSON(cmd, bs)
		}
		for _, b := range bs {
			fmt.Fprintf(cmd.OutOrStdout(), "%s  %-9s %s  %d records: %d imported, %d duplicates, %d conflicts, %d rejected%s\n",
				b.ID, b.Status, b.Created.Format(time.RFC3339), b.Records, b.Imported, b.Duplicates, b.Conflicts, b.Rejects, paren(b.Reason))
		}
		return nil
	}
	return c
}

func batchesShowCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "show ID [--db DIR|DSN] [--json]",
		Short: "Show one batch: manifest, counts, and every reject and conflict with its line",
		Long: `ID is the batch file's SHA-256 in hex (64 digits): the id issuer import and
perso upload print, the "sha256" of the batch's manifest, or sha256sum of
the file. For each rejected record the line and the reason (fix the
station's record, or accept the loss of that card); for each conflict
the line and the card: two different c for one Id, a possible active
attack or a double personalization (the card is refused until an admin
looks; see docs/ISSUER.md).`,
		Example: `  issuer batches show 3f2a…(the batch's sha256) --json | jq '.reject_list[].reason'`,
		Args:    cobra.ExactArgs(1),
	}
	openStore := dbFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print the report, rejects and conflicts as JSON")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id := strings.ToLower(args[0])
		if b, err := hex.DecodeString(id); err != nil || len(b) != sha256.Size {
			return fmt.Errorf("batch id %q: a batch is named by its file's SHA-256, 64 hex digits (issuer batches list shows them)", args[0])
		}
		ctx := cmd.Context()
		st, err := openStore(ctx)
		if err != nil {
			return err
		}
		defer st.Close()
		b, err := st.Batch(ctx, id)
		if errors.Is(err, issuer.ErrNotFound) {
			return fmt.Errorf("%w in this store (issuer batches list shows the batches; is --db the right store?)", err)
		}
		if err != nil {
			return err
		}
		d, err := issuer.Detail(ctx, st, b)
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(cmd, d)
		}
		w := cmd.OutOrStdout()
		fmt.Fprintf(w, "batch     %s\nstatus    %s%s\n", b.ID, b.Status, paren(b.Reason))
		fmt.Fprintf(w, "counts    %d records: %d imported, %d duplicates, %d conflicts, %d rejected\n",
			b.Records, b.Imported, b.Duplicates, b.Conflicts, b.Rejects)
		fmt.Fprintf(w, "manifest  %s\n", b.Manifest)
		for _, r := range d.RejectList {
			fmt.Fprintf(w, "line %d: rejected: %s\n", r.Line, r.Reason)
		}
		for _, k := range d.ConflictList {
			fmt.Fprintf(w, "line %d: CONFLICT: card %x stored with another c\n", k.Line, []byte(k.CardID))
		}
		return nil
	}
	return c
}
