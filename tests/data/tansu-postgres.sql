-- The PostgreSQL schema tansu 0.6's `postgres://` storage engine expects. tansu does not
-- create it (its crate ships the SQLite DDL only, in tansu-storage's src/ddl); this is
-- that DDL written for PostgreSQL, with the column types the engine's queries bind and
-- read (i32 ids and partitions, i64 offsets and producer ids, i16 epochs and record
-- attributes, timestamptz times, bytea keys and values, a uuid topic id, a json group
-- detail), plus the record's transaction id that its fetch compares with the current
-- snapshot. tests/common/mod.rs applies it to a fresh database per test broker.

create table if not exists cluster (
    id serial primary key,
    name text not null unique,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);

create table if not exists consumer_group (
    id serial primary key,
    cluster integer references cluster (id) on delete cascade not null,
    name text not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);

create table if not exists producer (
    id bigserial primary key,
    cluster integer references cluster (id) on delete cascade not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);

create table if not exists scram_credential (
    id serial primary key,
    cluster integer references cluster (id) on delete cascade not null,
    username text not null,
    mechanism integer not null,
    salt bytea not null,
    iterations integer not null,
    stored_key bytea not null,
    server_key bytea not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, username, mechanism)
);

create table if not exists topic (
    id serial primary key,
    cluster integer references cluster (id) on delete cascade not null,
    name text not null,
    uuid uuid not null,
    partitions integer not null,
    replication_factor integer not null,
    is_internal boolean default false not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);

create table if not exists consumer_group_detail (
    id serial primary key,
    consumer_group integer references consumer_group (id) on delete cascade,
    e_tag uuid not null,
    detail json not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (consumer_group)
);

create table if not exists producer_epoch (
    id serial primary key,
    producer bigint references producer (id) on delete cascade,
    epoch smallint default 0 not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (producer, epoch)
);

create table if not exists topic_configuration (
    id serial primary key,
    topic integer references topic (id) on delete cascade,
    name text not null,
    value text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (topic, name)
);

create table if not exists topition (
    id serial primary key,
    topic integer references topic (id) on delete cascade,
    partition integer,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (topic, partition)
);

create table if not exists txn (
    id serial primary key,
    cluster integer references cluster (id) on delete cascade,
    name text,
    producer bigint references producer (id) on delete cascade,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);

create table if not exists consumer_offset (
    id serial primary key,
    consumer_group integer references consumer_group (id) on delete cascade,
    topition integer references topition (id) on delete cascade,
    committed_offset bigint,
    leader_epoch integer,
    timestamp timestamptz,
    metadata text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (consumer_group, topition)
);

create table if not exists record (
    id bigserial,
    topition integer references topition (id) on delete cascade,
    offset_id bigint not null,
    attributes smallint,
    producer_id bigint,
    producer_epoch smallint,
    timestamp timestamptz,
    k bytea,
    v bytea,
    transaction_id xid8 default pg_current_xact_id() not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    primary key (topition, offset_id)
);

create table if not exists header (
    topition integer,
    offset_id bigint,
    k bytea,
    v bytea,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    foreign key (topition, offset_id) references record (topition, offset_id) on delete cascade
);

create table if not exists producer_detail (
    id serial primary key,
    producer_epoch integer references producer_epoch (id) on delete cascade,
    topition integer references topition (id) on delete cascade,
    sequence integer default 0 not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (producer_epoch, topition)
);

create table if not exists txn_detail (
    id serial primary key,
    "transaction" integer references txn (id),
    producer_epoch integer references producer_epoch (id),
    transaction_timeout_ms integer not null,
    started_at timestamptz,
    status text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique ("transaction", producer_epoch)
);

create table if not exists watermark (
    id serial primary key,
    topition integer references topition (id) on delete cascade unique,
    low bigint,
    high bigint,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);

create table if not exists txn_offset_commit (
    id serial primary key,
    txn_detail integer references txn_detail (id) on delete cascade,
    consumer_group integer references consumer_group (id) on delete cascade,
    generation_id integer,
    member_id text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (txn_detail, consumer_group)
);

create table if not exists txn_topition (
    id serial primary key,
    txn_detail integer references txn_detail (id) on delete cascade,
    topition integer references topition (id) on delete cascade,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (txn_detail, topition)
);

create table if not exists txn_offset_commit_tp (
    id serial primary key,
    offset_commit integer references txn_offset_commit (id) on delete cascade,
    topition integer references topition (id) on delete cascade,
    committed_offset bigint,
    leader_epoch integer,
    metadata text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (offset_commit, topition)
);

create table if not exists txn_produce_offset (
    id serial primary key,
    txn_topition integer references txn_topition (id) on delete cascade unique,
    offset_start bigint,
    offset_end bigint,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);
