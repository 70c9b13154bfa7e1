-- A registered model keeps its dimensions (issue 34): `migrate` with only model.dimensions
-- changed used to overwrite the registry's (1024 while the rows were 1536), so every search
-- cast the rows to the wrong size and failed, and the new index build was left INVALID.
-- Refused here too, after the CLI's own check (lifecycle::check_dimensions), for any caller.
-- A model without rows may still change size: nothing is stored at the old one.

CREATE OR REPLACE FUNCTION embed_worker.ensure_model(model text, dims integer, itype text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    part text := embed_worker.partition_name(model);
    registered integer;
    has_rows boolean := false;
BEGIN
    SELECT m.dimensions INTO registered FROM embed_worker.models m WHERE m.name = model;
    IF registered IS NOT NULL AND registered <> dims AND to_regclass(format('public.%I', part)) IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I)', part) INTO has_rows;
        IF has_rows THEN
            RAISE EXCEPTION 'model % is registered with % dimensions and has rows; refusing % (give the new size a new model name)',
                model, registered, dims
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    INSERT INTO embed_worker.models (name, dimensions, index_type, partition)
    VALUES (model, dims, itype, part)
    ON CONFLICT (name) DO UPDATE SET dimensions = EXCLUDED.dimensions,
                                     index_type = EXCLUDED.index_type;
    IF to_regclass(format('public.%I', part)) IS NULL THEN
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.rag_embeddings FOR VALUES IN (%L)',
                       part, model);
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', part);
    END IF;
    RETURN part;
END $$;
REVOKE EXECUTE ON FUNCTION embed_worker.ensure_model(text, integer, text) FROM PUBLIC;
